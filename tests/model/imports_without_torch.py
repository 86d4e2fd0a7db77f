"""Imports meta_mask's model modules in a fresh interpreter and exits with status 1 if that
imported torch (the reference the tests compare with), else 0; for test_hf.py.

    python -m tests.model.imports_without_torch
"""

from __future__ import annotations

import sys


def main() -> int:
    import meta_mask.model.bart  # noqa: F401
    import meta_mask.model.hf  # noqa: F401

    return int("torch" in sys.modules)


if __name__ == "__main__":
    sys.exit(main())
