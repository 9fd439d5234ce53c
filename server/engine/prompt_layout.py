"""A templated adapter's request as token ids: rows, anchors and text in template order.

An adapter uploaded with a P-tuning template (adapters_store.template) places its rows around
the request's text with literal anchor text between them. The template is parsed and its
anchors are tokenized once per template (each alone, without special tokens); a request's ids
are then assembled when it starts, from its pinned rows' virtual ids and its text's ids (the
text tokenized as for any request, or the chat template's rendered output).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from typing import Any

from adapters_store.template import MAX_TEMPLATE_CHARS as MAX_TEMPLATE_CHARS  # for server.api
from adapters_store.template import Anchor, Soft, Text, parse_template

Piece = Soft | Text | tuple[int, ...]  # an anchor is its token ids
Layout = tuple[Piece, ...]


class Layouts:
    """Parsed templates with their anchors tokenized, least recently used kept (per engine,
    used from one thread)."""

    def __init__(self, tokenizer: Any, *, size: int = 1024) -> None:
        self._tokenizer = tokenizer
        self._size = size
        self._cache: OrderedDict[tuple[str, int], Layout] = OrderedDict()

    def get(self, template: str, rows: int) -> Layout:
        key = (template, rows)
        layout = self._cache.get(key)
        if layout is None:
            layout = tuple(self._piece(s) for s in parse_template(template, rows))
            self._cache[key] = layout
            if len(self._cache) > self._size:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return layout

    def _piece(self, segment: Soft | Text | Anchor) -> Piece:
        if isinstance(segment, Anchor):
            ids = self._tokenizer(segment.text, add_special_tokens=False)["input_ids"]
            return tuple(int(i) for i in ids)
        return segment


def compiled_pieces(text_ids: Sequence[int],
                    layout: Layout | None) -> Iterator[tuple[str, Sequence[int]]]:
    """The ids a request brings besides its virtual ids, each with what to call its source in
    an error: the prompt's (text, token ids or a rendered chat) and each template anchor's."""
    yield "the prompt", text_ids
    for piece in layout or ():
        if isinstance(piece, tuple):
            yield "the adapter's template", piece


def anchor_tokens(layout: Layout) -> int:
    return sum(len(p) for p in layout if isinstance(p, tuple))


def template_anchor_tokens(template: str, rows: int,
                           tokenize: Callable[[str], list[int]]) -> int:
    """A template's anchor tokens without an engine's Layouts (what a request of it adds to
    its text and rows); `tokenize` takes text without special tokens, as Layouts does."""
    return sum(len(tokenize(s.text)) for s in parse_template(template, rows)
               if isinstance(s, Anchor))


def assemble(layout: Layout, virtual_ids: Sequence[int], text_ids: Sequence[int]) -> list[int]:
    """The request's ids: each soft piece its rows' virtual ids, each anchor its ids, the text
    its ids, in template order."""
    out: list[int] = []
    for piece in layout:
        if isinstance(piece, Soft):
            out += virtual_ids[piece.start:piece.start + piece.count]
        elif isinstance(piece, Text):
            out += text_ids
        else:
            out += piece
    return out


def text_start(layout: Layout) -> int:
    """Where the text begins in an assembled request's ids."""
    start = 0
    for piece in layout:
        if isinstance(piece, Text):
            return start
        start += piece.count if isinstance(piece, Soft) else len(piece)
    raise ValueError("a layout holds its text exactly once")
