"""The one error type a user can cause.

Everything a user can get wrong (a missing file, a bad config key, a corrupt checkpoint) is raised
as `LMForgeError`; the CLI prints its message on one line and exits with status 2. Any other
exception is a bug in lmforge and is allowed to show a traceback.
"""


class LMForgeError(Exception):
    """A problem with the user's input, named in one clear sentence."""
