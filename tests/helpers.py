"""Helpers shared by the top-level pipeline tests."""

from __future__ import annotations


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
