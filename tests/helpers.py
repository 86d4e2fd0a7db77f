"""Helpers shared by the tests."""

from __future__ import annotations

import contextlib

from meta_mask.special_tokens import SpecialTokens

# BART's special ids as the test tokenizers lay them out (tests/data/tokenizer_helpers.py, the
# world's): <s>=0 <pad>=1 </s>=2 <mask>=4, decoder inputs starting with </s>; no sentinels.
BART_SPECIAL = SpecialTokens(pad=1, eos=2, bos=0, mask=4, decoder_start=2)


def parse_config(args: list[str]):
    """The Config that `meta_mask.train` builds from these command-line flags."""
    from absl import flags

    from meta_mask import train

    flags.FLAGS.unparse_flags()
    flags.FLAGS(["prog", *args])
    try:
        return train.config_from_flags()
    finally:
        flags.FLAGS.unparse_flags()


@contextlib.contextmanager
def x64():
    """float64 inside the block only (restored after, so other tests keep float32)."""
    import jax

    prev = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        yield
    finally:
        jax.config.update("jax_enable_x64", prev)
