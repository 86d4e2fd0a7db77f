"""The CLI, killed by a signal of its own at a known point: when the training loop asks for
the batch of step N of the stage whose progress bar reads DESC (that is, after N steps), this
process sends itself SIGNAL. A kill -9 (or a SIGTERM) at a chosen step, never a race; checkpoint
saves are made synchronous so that every checkpoint before that step is complete.

    python -m tests.kill_at_step DESC N SIGNAL -- <meta_mask.train flags>
"""

from __future__ import annotations

import dataclasses
import os
import signal
import sys

from meta_mask import train
from meta_mask.training import checkpoint, loop


def main() -> None:
    desc, step, name = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    if sys.argv[4] != "--":
        raise SystemExit(__doc__)
    original = loop.train

    def train_with_a_signal(learner, directory, options):
        if options.desc == desc:
            batch_for_step = learner.batch_for_step

            def batch_or_signal(s):
                if s == step:
                    os.kill(os.getpid(), getattr(signal, name))
                return batch_for_step(s)

            learner = dataclasses.replace(learner, batch_for_step=batch_or_signal)
        return original(learner, directory, options)

    loop.train = train_with_a_signal
    # Saves complete before the next step, so the signal finds every earlier checkpoint on
    # disk: the point of the kill is known exactly (test_checkpoint.py kills mid-save).
    save = checkpoint.CheckpointManager.save

    def save_and_wait(self, *args, **kwargs):
        saved = save(self, *args, **kwargs)
        self.wait_until_finished()
        return saved

    checkpoint.CheckpointManager.save = save_and_wait
    sys.argv = [sys.argv[0], *sys.argv[5:]]
    train.run_main()


if __name__ == "__main__":
    main()
