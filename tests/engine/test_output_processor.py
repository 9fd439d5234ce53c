"""server.engine.output_processor: a request's deltas of token ids become its text, stream
chunks and result, with a real tokenizer: stop strings found here trim everything past them."""

from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from server.engine.interface import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    SamplingParams,
    TokenChunk,
    TokenLogprob,
)
from server.engine.output_processor import RequestOutput
from server.engine.rows import RowDelta

TEXT = "Tweet: I love it. Label: complaint, and more after that"


@pytest.fixture
def tok(tiny_model_dirs):
    return AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])


def _ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def _output(tok, *, stream: bool, **params) -> RequestOutput:
    request = GenerationRequest("r", (1, 2, 3), "pt3", params=SamplingParams(**params))
    return RequestOutput(request, tok, stream=stream, prompt_tokens=5, virtual_tokens=7)


def _logprobs(ids: list[int]) -> tuple[TokenLogprob, ...]:
    return tuple(TokenLogprob(t, -float(i)) for i, t in enumerate(ids))


def _split(items) -> tuple[list[TokenChunk], list[GenerationResult]]:
    return ([i for i in items if isinstance(i, TokenChunk)],
            [i for i in items if isinstance(i, GenerationResult)])


def _completing(tok, ids: list[int], stop: str) -> int:
    """The index of the token whose text completes the first `stop`."""
    return next(k for k in range(len(ids)) if stop in tok.decode(ids[:k + 1]))


@pytest.mark.parametrize("stream", [True, False])
def test_a_stop_string_ends_the_request_and_trims_what_the_engine_drew_past_it(
        tok, stream) -> None:
    ids = _ids(tok, TEXT)
    last = _completing(tok, ids, "complaint")
    out = _output(tok, stream=stream, stop=("complaint",), logprobs=0, max_new_tokens=100)

    # The engine hands the ids out in three deltas; the stop completes inside the second.
    items = out.add(RowDelta(tuple(ids[:3]), logprobs=_logprobs(ids)[:3]))
    items += out.add(RowDelta(tuple(ids[3:]), logprobs=_logprobs(ids)[3:]))
    assert out.finished
    assert out.add(RowDelta((ids[0],), logprobs=_logprobs(ids)[:1])) == []  # ignored now

    chunks, [result] = _split(items)
    assert result.finish_reason is FinishReason.STOP
    assert result.text == TEXT[:TEXT.index("complaint")]
    assert list(result.token_ids) == ids[:last + 1]
    assert result.completion_tokens == last + 1
    assert result.logprobs == _logprobs(ids)[:last + 1]
    assert (result.prompt_tokens, result.virtual_tokens) == (5, 7)
    if stream:
        assert "".join(c.text for c in chunks) == result.text
        assert sum((c.token_ids for c in chunks), ()) == result.token_ids
        assert sum((c.logprobs or () for c in chunks), ()) == result.logprobs
    else:
        assert chunks == []


@pytest.mark.parametrize("stream", [True, False])
def test_the_eos_tokens_text_is_not_the_requests(tok, stream) -> None:
    ids = [*_ids(tok, "hello there"), tok.eos_token_id]
    out = _output(tok, stream=stream)

    items = out.add(RowDelta(tuple(ids[:2])))
    items += out.add(RowDelta(tuple(ids[2:]), finish_reason=FinishReason.EOS))

    chunks, [result] = _split(items)
    assert result.finish_reason is FinishReason.EOS
    assert result.token_ids == tuple(ids)  # the eos id is counted
    assert result.text == "hello there"
    assert "".join(c.text for c in chunks) == ("hello there" if stream else "")


def test_a_streams_first_chunk_leaves_with_its_first_token_though_its_text_is_held(tok) -> None:
    """"com" could still become the stop string "complaint": its text waits, its id does not."""
    ids = _ids(tok, "complete")
    out = _output(tok, stream=True, stop=("complaint",))
    first = _ids(tok, "com")
    assert ids[:len(first)] == first, "the tokenizer splits 'complete' differently"

    [chunk] = out.add(RowDelta(tuple(first)))
    assert chunk.token_ids == tuple(first) and chunk.text == ""

    items = out.add(RowDelta(tuple(ids[len(first):]), finish_reason=FinishReason.LENGTH))
    chunks, [result] = _split(items)
    assert result.text == "complete" and result.finish_reason is FinishReason.LENGTH
    assert "".join(c.text for c in chunks) == "complete"


def test_a_stop_string_completed_by_the_last_tokens_text_wins_over_length(tok) -> None:
    ids = _ids(tok, "say stop")
    out = _output(tok, stream=False, stop=("stop",))

    [result] = out.add(RowDelta(tuple(ids), finish_reason=FinishReason.LENGTH))

    assert result.finish_reason is FinishReason.STOP and result.text == "say "


def test_a_request_that_asked_for_logprobs_refuses_tokens_without_them(tok) -> None:
    out = _output(tok, stream=False, logprobs=1)
    with pytest.raises(RuntimeError, match="without them"):
        out.add(RowDelta((5, 6), finish_reason=FinishReason.LENGTH))


def test_prompt_logprobs_go_out_once_in_the_first_chunk(tok) -> None:
    prompt = (None, TokenLogprob(2, -1.0))
    out = _output(tok, stream=True, prompt_logprobs=0)
    ids = _ids(tok, "ab cd")

    items = out.add(RowDelta(tuple(ids[:1]), prompt_logprobs=prompt))
    items += out.add(RowDelta(tuple(ids[1:]), finish_reason=FinishReason.LENGTH))

    chunks, [result] = _split(items)
    assert chunks[0].prompt_logprobs == prompt
    assert all(c.prompt_logprobs is None for c in chunks[1:])
    assert result.prompt_logprobs == prompt
