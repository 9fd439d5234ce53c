"""Which token ids may reach the model: real embedding rows, and a request's own virtual ids.

The model's input embedding reads an id at or above its row count as a row of the prompt table
(server.engine.prompt_table), that is, as some adapter's soft prompt. A request's own virtual
ids are placed by its compiled prompt (server.engine.prompt_pins); every other id it carries
(its text, a token-id prompt, a rendered chat, a template's anchors, what echo scores) must be a
real row of the embedding, or the request would read whatever adapter holds that table row.

A tokenizer can know more ids than the embedding has rows (special tokens added to a tokenizer
without resizing the embedding; many checkpoints ship so), so text can tokenize to such an id.
Such a request is refused with a 400 that names the token, before it is queued; and the
compiled prompt is checked again where the loops build the ids the model reads.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from server.engine.errors import InvalidRequestError, UnembeddableTokenError


def first_outside(ids: Sequence[int], vocab_size: int) -> int | None:
    """The first id that is not a row of an embedding of `vocab_size` rows, or None."""
    if not ids or (min(ids) >= 0 and max(ids) < vocab_size):
        return None
    return next(i for i in ids if i < 0 or i >= vocab_size)


class TokenBounds:
    """The model's embedding size beside its tokenizer's, for naming refused tokens."""

    def __init__(self, tokenizer: Any, vocab_size: int) -> None:
        self._tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.tokenizer_size = len(tokenizer)

    def unembeddable_tokens(self) -> list[str]:
        """What the tokenizer knows beyond the embedding's rows (empty on most models)."""
        if self.tokenizer_size <= self.vocab_size:
            return []
        return [str(t) for t in self._tokenizer.convert_ids_to_tokens(
            list(range(self.vocab_size, self.tokenizer_size)))]

    def check(self, ids: Sequence[int], *, source: str) -> None:
        """Raise unless every id is a row of the embedding. `source` names where the ids came
        from ("the prompt", "the template's anchor ' Label:'") for the message."""
        bad = first_outside(ids, self.vocab_size)
        if bad is None:
            return
        if bad < self.tokenizer_size and bad >= 0:
            token = self._tokenizer.convert_ids_to_tokens(bad)
            raise UnembeddableTokenError(
                f"{source} holds the token {token!r} (id {bad}), which the tokenizer knows but "
                f"the model cannot embed: its input embedding has {self.vocab_size} rows. "
                f"Remove that token from {source}")
        raise InvalidRequestError(
            f"token ids must be in [0, {self.vocab_size}); got {min(ids)}..{max(ids)}")

    def check_all(self, pieces: Iterable[tuple[str, Sequence[int]]]) -> None:
        for source, ids in pieces:
            self.check(ids, source=source)
