"""Full-precision float32 matmuls for the model tests on accelerators.

The parity tests compare our float32 logits with PyTorch BART's to 1e-4; on GPUs jax's default
float32 matmul precision is TF32 (a 10-bit mantissa), which misses that by orders of magnitude.
The model never sets jax.config: the tests (here) and scripts (bench/gpu.sh) do. On CPU float32
matmuls are exact already and nothing is changed.
"""

import jax

if jax.default_backend() != "cpu":
    jax.config.update("jax_default_matmul_precision", "highest")
