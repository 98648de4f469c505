"""The one exception type that the command line turns into a short message and exit code 1."""


class KdError(Exception):
    """A problem the user can fix: bad config, missing file, unknown name.

    The message says what is wrong and how to fix it; the command line prints it without a
    traceback (set HYDRA_FULL_ERROR=1 to see one).
    """
