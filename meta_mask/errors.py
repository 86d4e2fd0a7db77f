"""The base class of errors that are the user's to fix, and nothing else.

A `UserError` says what is wrong with the user's input (a flag, a data file, a checkpoint
folder, the network) and how to fix it, in its message alone: the command line prints that
message without a traceback and exits with status 1. Any other exception is a bug in meta_mask,
and keeps its traceback.

Each module defines its own subclasses next to the code that raises them (e.g.
data/task_spec.py's TaskDataError, model/hf.py's CheckpointError); a subclass usually also
derives from the builtin error it stands for (ValueError, FileNotFoundError, ConnectionError)
so callers that catch those keep working.
"""


class UserError(Exception):
    """An error in the user's input; its message alone says what to change."""
