"""meta_mask: masking policies for MLM intermediate pre-training of BART-style models, in JAX.

README.md describes the study this reimplements and how to run it; docs/design.md the design:
model/ (BART, generation, Hugging Face I/O) -> data/ (tasks, corpora, the synthetic world)
-> policies/ (scorers, the shared mask sampler, learned policies) -> training/ (the one loop,
the one train step, checkpoints, sharding) -> evaluation/ (metrics, statistics, reports);
pipeline.py lists a run's stages, stages.py runs them, train.py is the command line.
"""

__version__ = "0.1.0"
