"""P-tuning templates: where an adapter's virtual tokens go around the request's text.

A template is text with markers: `{soft:N}` is the adapter's next N rows, in order (N >= 1);
`{soft}` is all the rows not used yet; `{text}` is the request's text, exactly once; `{{` and
`}}` are literal braces; everything else is literal anchor text. Every row is used exactly once.
No template means `{soft}{text}`: the rows before the text, as PEFT places them.

    "{soft:3} Review: {text} {soft} Sentiment:"

on a 8-row adapter is rows 0-2, the anchor " Review: ", the text, the anchor " ", rows 3-7 and
the anchor " Sentiment:". Parsing happens at upload (a bad template is refused before anything
is stored) and again, cheaply, when a request uses it.

N is ASCII digits only: `{soft:８}` (fullwidth) and `{soft:٣}` (Arabic-Indic) are refused, so
that a count means one thing to every reader of the stored template, not only to int().
Anchors may hold any text a prompt holds, tab, newline and carriage return included, but not
the other control characters (NUL, escapes, DEL, C1) nor the bidi embeddings, overrides and
isolates (U+202A-U+202E, U+2066-U+2069): the stored template would display differently from
what the model reads. The limit, MAX_TEMPLATE_CHARS, counts characters, not bytes.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

from adapters_store.errors import InvalidTemplateError

MAX_TEMPLATE_CHARS = 4096
_MARKER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")
_SOFT_COUNT = re.compile(r"soft:([0-9]+)")
# Control characters other than tab, newline and carriage return; bidi embeddings, overrides
# and isolates.
_REFUSED = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f\u202a-\u202e\u2066-\u2069]")


@dataclass(frozen=True)
class Soft:
    start: int  # first row
    count: int


@dataclass(frozen=True)
class Text:
    pass


@dataclass(frozen=True)
class Anchor:
    text: str


Segment = Soft | Text | Anchor


def parse_template(template: str, rows: int) -> tuple[Segment, ...]:
    """The segments of `template` for an adapter of `rows` virtual tokens, in order; raises
    InvalidTemplateError naming what is wrong."""
    if not isinstance(template, str) or not template:
        raise InvalidTemplateError("template must be a non-empty string (omit it for the "
                                   "default, {soft}{text})")
    if len(template) > MAX_TEMPLATE_CHARS:
        raise InvalidTemplateError(f"template has {len(template)} characters; at most "
                                   f"{MAX_TEMPLATE_CHARS} characters are allowed")
    if (bad := _REFUSED.search(template)) is not None:
        raise InvalidTemplateError(
            f"the template has {_named(bad.group())} at character {bad.start()}: control "
            "characters other than tab, newline and carriage return, and bidi embedding, "
            "override and isolate characters (U+202A-U+202E, U+2066-U+2069) are not allowed")
    segments: list[Segment] = []
    literal: list[str] = []
    used = texts = 0
    rest_at: int | None = None  # where {soft} stands, sized once the explicit counts are known
    position = 0

    def flush() -> None:
        if literal:
            segments.append(Anchor("".join(literal)))
            literal.clear()

    for match in _MARKER.finditer(template):
        literal.append(template[position:match.start()])
        position = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal.append(token[0])
            continue
        if token in ("{", "}"):
            raise InvalidTemplateError(
                f"unmatched {token!r} at character {match.start()} of the template; write "
                f"{token * 2!r} for a literal brace")
        name = match.group(1)
        flush()
        if name == "text":
            texts += 1
            segments.append(Text())
        elif name == "soft":
            if rest_at is not None:
                raise InvalidTemplateError("{soft} (all remaining rows) appears twice; use "
                                           "{soft:N} for an explicit count")
            rest_at = len(segments)
            segments.append(Soft(0, 0))  # sized below
        elif (m := _SOFT_COUNT.fullmatch(name)) is not None:
            count = int(m.group(1))
            if count < 1:
                raise InvalidTemplateError("{soft:0}: a soft segment takes at least one row")
            segments.append(Soft(0, count))
            used += count
        elif name.startswith("soft:") and name[5:].isdigit():
            odd = next(c for c in name[5:] if c not in "0123456789")
            raise InvalidTemplateError(
                f"{{{name}}} at character {match.start()}: the count has {_named(odd)}; write "
                "N in ASCII digits 0-9")
        else:
            raise InvalidTemplateError(
                f"unknown marker {{{name}}} at character {match.start()}: the markers are "
                "{soft:N}, {soft} and {text} ({{ and }} for literal braces)")
    literal.append(template[position:])
    flush()
    if texts != 1:
        raise InvalidTemplateError(f"the template must contain {{text}} exactly once, "
                                   f"found {texts}")
    if used > rows:
        raise InvalidTemplateError(f"the template uses {used} rows; the adapter has {rows} "
                                   "(every row exactly once)")
    if rest_at is not None:
        if used == rows:
            raise InvalidTemplateError(
                f"{{soft}} would take no rows: the {{soft:N}} segments already use {used} of "
                f"the adapter's {rows}")
        segments[rest_at] = Soft(0, rows - used)
    elif used != rows:
        raise InvalidTemplateError(f"the template uses {used} rows; the adapter has {rows} "
                                   "(every row exactly once)")
    out: list[Segment] = []
    start = 0
    for segment in segments:
        if isinstance(segment, Soft):
            out.append(Soft(start, segment.count))
            start += segment.count
        elif not (isinstance(segment, Anchor) and not segment.text):
            out.append(segment)
    return tuple(out)


def _named(char: str) -> str:
    """'U+202E (RIGHT-TO-LEFT OVERRIDE)': a character a message can show without showing it."""
    return f"U+{ord(char):04X} ({unicodedata.name(char, 'control character')})"
