"""The one exception type for user errors; the CLI prints its message on one line and exits 1."""


class MergeError(Exception):
    """A problem with the user's inputs or options, with a message that names it and the fix."""


class TokenRenameWarning(UserWarning):
    """Two deltas used the same token name for different embeddings; one was renamed."""
