"""The one exception type for problems a user can cause and fix."""


class TerrasamError(Exception):
    """A user-facing error: its message is one clear sentence, shown without a traceback."""
