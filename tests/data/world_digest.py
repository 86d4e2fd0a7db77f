"""The sha256 of a synthetic world's sentences and splits, so that test_world.py can compare
worlds built in processes with different PYTHONHASHSEED values.

    python -m tests.data.world_digest NUM_PEOPLE NUM_BIOS

prints the digest of build_world(WorldConfig(num_people=NUM_PEOPLE, num_bios=NUM_BIOS)).
"""

from __future__ import annotations

import hashlib
import json
import sys

from meta_mask.config import WorldConfig
from meta_mask.data.world import World, build_world


def world_digest(world: World) -> str:
    """The hex sha256 of the world's sentences and splits as JSON."""
    return hashlib.sha256(json.dumps([world.sentences, world.splits]).encode()).hexdigest()


if __name__ == "__main__":
    config = WorldConfig(num_people=int(sys.argv[1]), num_bios=int(sys.argv[2]))
    print(world_digest(build_world(config)))
