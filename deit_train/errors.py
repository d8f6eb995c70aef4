"""The one error type for bad input: the CLI prints its message and exits, without a traceback."""


class DeitTrainError(Exception):
    """A problem with the user's config, data or files. The message names the problem and the fix."""
