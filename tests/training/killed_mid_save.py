"""A process that dies in the middle of an async checkpoint save, for test_checkpoint.py.

    python -m tests.training.killed_mid_save DIR

saves step 1 (a 4 x 4 array of ones) completely into DIR, starts the async save of a large
step 2, and exits at once with status 0: no wait, no close, no atexit.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from meta_mask.training import checkpoint


def main(directory: str) -> None:
    manager = checkpoint.CheckpointManager(directory)
    manager.save(1, {"w": np.full((4, 4), 1.0, np.float32)}, {"model": {"d_model": 4}})
    manager.wait_until_finished()
    big = np.random.default_rng(0).standard_normal((2000, 2000)).astype(np.float32)
    manager.save(2, {"w": big}, {"model": {"d_model": 4}})  # async: returns mid-write
    os._exit(0)  # the kill: no wait, no close, no atexit


if __name__ == "__main__":
    main(sys.argv[1])
