"""Text the tokenizer can take: the one string type of every text field in a request body.

JSON's "\\ud800" escape decodes to a lone UTF-16 surrogate. Python holds it in a str, but no
tokenizer can encode it (UTF-8 has no form for it), so it would fail deep in the engine, or
in the pipe to the engine process, as a 500. Every text field of every route (prompts, chat
content and names, stop strings, `user`, `model`) is this type, so such text is refused at
the edge with the route's validation error naming the field. It is strict, as every field at
the edge is: a number is not text.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

from pydantic import AfterValidator, Discriminator, Strict, Tag


def tokenizable(value: str) -> str:
    """`value` unchanged, or ValueError naming the first lone surrogate and where it is."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"contains an unpaired surrogate U+{ord(value[e.start]):04X} at "
                         f"character {e.start}; send valid Unicode text (a surrogate escape "
                         "only as half of a pair)") from e
    return value


TokenizableText = Annotated[str, Strict(), AfterValidator(tokenizable)]


def by_json_type(pick: Callable[[Any], str | None], /, *, forms: str) -> Discriminator:
    """A union's discriminator choosing its one member from the value's JSON shape.

    Without it a union reports every member's error (a prompt with a lone surrogate would
    also read "Input should be a valid list" three times); with it, only the member the value
    was meant to be, and a value of no member's shape reads "Input should be {forms}". `pick`
    returns the member's tag; tags are named as their types are written (`str`, `list[int]`),
    which OpenAI's errors leave out of the parameter's name.
    """
    return Discriminator(pick, custom_error_type="invalid_type",
                         custom_error_message=f"Input should be {forms}")


def text_or_list(value: Any) -> str | None:
    """The tag of `str | list[str]`: "str" for a string, "list[str]" for a list."""
    if isinstance(value, str):
        return "str"
    return "list[str]" if isinstance(value, list) else None


StopStrings = Annotated[
    Annotated[TokenizableText, Tag("str")] | Annotated[list[TokenizableText], Tag("list[str]")],
    by_json_type(text_or_list, forms="a string or a list of strings")]
