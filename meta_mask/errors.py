"""The one base class of errors that are the user's to fix (a bad flag value, a malformed data
file, an unreachable hub, a workdir that holds another run): the CLI prints their message alone,
without a traceback. Any other exception is a bug and keeps its traceback."""


class UserError(Exception):
    """An error the user can act on; its message says what is wrong and what to do."""
