"""meta_mask: masking policies for MLM intermediate pre-training of BART-style models, in JAX.

See README.md for the study this reimplements and ../DESIGN notes for the architecture:
model/ (BART, generation, Hugging Face I/O) -> data/ (tasks, corpora, the synthetic world)
-> policies/ (scorers, the shared mask sampler, learned policies) -> training/ (the one
train step, checkpoints, sharding) -> evaluation/ (metrics, reports); pipeline.py conducts.
"""

__version__ = "0.1.0"
