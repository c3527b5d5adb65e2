"""The one exception type for mistakes a user can fix (bad data, bad config, missing file).

The CLI prints its message on one line and exits with status 2, never a traceback.
Everything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input, named with its place (file, row, field, flag)."""
