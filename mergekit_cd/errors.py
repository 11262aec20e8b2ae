"""The one exception type for user errors; the CLI prints its message on one line and exits 1."""


class MergeError(Exception):
    """A problem with the user's inputs or options, with a message that names it and the fix."""


def first_line(error: BaseException) -> str:
    """The first line of ``error``'s message, or its type's name when it has none: how a
    library's error is named inside one of ours."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


class TokenRenameWarning(UserWarning):
    """A token was renamed: two deltas used one name for different embeddings, or a CompVis
    checkpoint's rows had to carry the positional names the authors' sampler gives them."""
