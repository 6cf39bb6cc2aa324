"""The one exception type for user mistakes: bad input, bad config, missing files.

The CLI turns it into a one-line message and exit code 2, never a traceback.
"""


class AdvcapError(Exception):
    """A user-facing error: the message says what is wrong and where."""
