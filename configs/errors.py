"""The project's one error root. Every error a user can act on (bad input, missing stage output, a config
key out of range, unreachable storage) is a subclass: its message names the file, row, column or key and
what to do, and the command lines print it as one line instead of a traceback."""


class RecloraError(Exception):
    """An error the user can act on; the message says where and what to do."""
