"""The one shared train step, optimizer, checkpoints and sharding."""
