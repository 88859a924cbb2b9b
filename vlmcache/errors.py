"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class VlmcacheError(Exception):
    """A problem the user can fix (bad input, missing file, mismatched cache); the message says how."""
