"""Which ids may reach the model, against a tokenizer that knows more tokens than the
embedding has rows."""

from __future__ import annotations

import pytest

from server.engine.byte_tokenizer import BYTE_VOCAB_SIZE, make_byte_tokenizer
from server.engine.errors import InvalidRequestError, UnembeddableTokenError
from server.engine.token_bounds import TokenBounds, first_outside


@pytest.fixture()
def bounds() -> TokenBounds:
    tokenizer = make_byte_tokenizer()
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|tool|>"]})
    return TokenBounds(tokenizer, BYTE_VOCAB_SIZE)


def test_first_outside_finds_the_first_id_that_is_not_a_row():
    assert first_outside([], 10) is None
    assert first_outside([0, 9], 10) is None
    assert first_outside([3, 10, -1], 10) == 10
    assert first_outside([3, -1, 10], 10) == -1


def test_the_tokens_past_the_embedding_are_listed(bounds):
    assert bounds.unembeddable_tokens() == ["<|tool|>"]
    assert TokenBounds(make_byte_tokenizer(), BYTE_VOCAB_SIZE).unembeddable_tokens() == []


def test_a_token_the_tokenizer_knows_is_named(bounds):
    with pytest.raises(UnembeddableTokenError, match=r"'<\|tool\|>' \(id 260\).*the prompt"):
        bounds.check([5, BYTE_VOCAB_SIZE], source="the prompt")


def test_an_id_nobody_knows_is_out_of_range(bounds):
    with pytest.raises(InvalidRequestError, match=r"token ids must be in \[0, 260\)") as e:
        bounds.check([5, 10_000], source="the prompt")
    assert not isinstance(e.value, UnembeddableTokenError)
    bounds.check([0, BYTE_VOCAB_SIZE - 1], source="the prompt")
