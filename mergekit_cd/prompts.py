"""A concept's target prompts: the paper's templates, filled with its token and class word."""

from __future__ import annotations

from collections.abc import Sequence

from .errors import MergeError

#: Target prompts of an object concept: the paper's two prompts.
OBJECT_TEMPLATES = ("{token} {class_word}", "photo of a {token} {class_word}")
#: Target prompts of a style concept: the authors' style prompt plus the bare token prompt.
STYLE_TEMPLATES = ("{token} {class_word}", "painting in the style of {token} {class_word}")


def target_prompts(token: str, class_word: str, *, templates: Sequence[str] | None = None,
                   style: bool = False) -> list[str]:
    """A concept's target prompts: each template filled with ``token`` and ``class_word``.

    Defaults: :data:`OBJECT_TEMPLATES`, or :data:`STYLE_TEMPLATES` when ``style`` is set.
    Style is only ever this explicit flag: the authors switched templates whenever the class
    string contained "art", so "cartoon" or "party" counted as styles. Runs of spaces are
    collapsed (an empty class word or token leaves no stray space) and repeated prompts
    dropped (duplicate constraints would make the hard merge singular).
    """
    chosen = tuple(templates) if templates else (STYLE_TEMPLATES if style else OBJECT_TEMPLATES)
    prompts: list[str] = []
    for template in chosen:
        if "{token}" not in template:
            raise MergeError(f"Target template {template!r} lacks {{token}}; every target prompt must "
                             f"contain the concept's modifier token.")
        try:
            prompt = " ".join(template.format(token=token, class_word=class_word).split())
        except (KeyError, IndexError, ValueError) as error:
            raise MergeError(f"Target template {template!r} may only use {{token}} and {{class_word}} "
                             f"({error!r}).") from None
        if prompt not in prompts:
            prompts.append(prompt)
    return prompts
