"""Performance harness: `python -m bench` from the repository root (bench/README.md).

Owns the speed measurements of the README's Performance section, all taken in ONE process with
interleaved repeats (A, B, A, B, ...) so that machine noise hits every contender alike; the
reported numbers are medians over `--repeats` (>= 5) repeats.

  a. train_vs_torch  our jitted train step (AdamW + global-norm clip, dropout on) against Hugging
                     Face PyTorch `BartForConditionalGeneration` + `torch.optim.AdamW` (+ clip)
                     at the same config, batch, lengths and float32, on CPU: tokens/s each and
                     the ratio. tokens = B * (S + T): every encoder and decoder position
                     (train_step.py).
  b. mfu             model FLOP/s of our step / the machine's float32 matmul peak, measured
                     here as a large `jnp.dot` (2 N^3 FLOPs). Model FLOPs are analytical
                     (flops.py) and cross-checked against XLA's `cost_analysis()` of the
                     compiled step.
  c. meta            the second-order meta step (remat on) at K = 1 and K = 4 inner steps over a
                     plain train step on the same inner batch, and the compiled peak memory
                     (memory_analysis(): temp + argument + output - alias bytes) for K = 1..8
                     (meta_step.py).
  d. masking         host-side intermediate batches per heuristic policy in sentences/s, on the
                     path a run takes (a cached corpus, the scorer the pipeline builds, PMI
                     n-grams included, and MlmBatches), against the sentences/s the train step
                     of (a) consumes (masking.py).
  e. generation      greedy and beam search (jitted while loops with the decode cache): output
                     tokens/s (B * max_length per call; EOS is suppressed so every call decodes
                     the full length) (generation.py).

run.py runs the sections, report.py renders the table, cli.py reads the flags. jax and torch
are imported lazily (torch only here, never by the library; install it with
`pip install -e '.[test]'`, torch==2.13.0; without it section (a) reports torch as skipped).
"""
