"""Per row, under static batching (run_batch) and the engine core alike: max_new_tokens, eos,
stop strings and streaming (through the frontend, as a client gets them), abort, input checks."""

from __future__ import annotations

import pytest
import torch

from server.engine.generation import run_batch
from server.engine.interface import FinishReason, SamplingParams
from server.engine.rows import BatchRow, RowDelta
from tests.engine.conftest import make_row, run_one, served

TEXTS = ("Tweet: I love it. Label:", "a", "The quick brown fox", "Hi")


def test_each_row_stops_at_its_own_max_new_tokens(model_and_tokenizer, run) -> None:
    model, tok = model_and_tokenizer
    outs = run(model, tok, [
        make_row(tok, TEXTS[0], max_new_tokens=3, ignore_eos=True),
        make_row(tok, TEXTS[0], max_new_tokens=11, ignore_eos=True),
        make_row(tok, TEXTS[1], max_new_tokens=1, ignore_eos=True, temperature=1.0, seed=0),
    ])

    assert [len(o.token_ids) for o in outs] == [3, 11, 1]
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
    assert outs[0].token_ids == outs[1].token_ids[:3]


def _greedy_ids(model, tok, text: str, n: int) -> list[int]:
    row = make_row(tok, text, max_new_tokens=n, ignore_eos=True)
    return list(run_one(model, tok, row).token_ids)


def test_eos_finishes_the_row_unless_ignore_eos(llama, run) -> None:
    model, tok = llama
    ids = _greedy_ids(model, tok, TEXTS[0], 16)
    k = next(i for i in range(2, 16) if ids[i] not in ids[:i])  # a token first seen at step k
    model.generation_config.eos_token_id = ids[k]  # the model now "ends" there

    stops, ignores = served(run, model, tok, [
        make_row(tok, TEXTS[0], max_new_tokens=16),
        make_row(tok, TEXTS[0], max_new_tokens=16, ignore_eos=True),
    ], stream=False)

    assert stops.finish_reason is FinishReason.EOS
    assert list(stops.token_ids) == ids[: k + 1]  # the eos id included
    assert stops.text == tok.decode(ids[:k], skip_special_tokens=True)  # but not its text
    assert ignores.finish_reason is FinishReason.LENGTH
    assert list(ignores.token_ids) == ids  # the plain greedy continuation, eos drawn


def _decode(tok, ids) -> str:
    return tok.decode(list(ids), skip_special_tokens=True)


def _printable_stop(model, tok) -> tuple[str, list[int], str, int]:
    """A text whose greedy output holds a printable 2-char string, that string, and the index
    of the token completing its first occurrence."""
    for text in TEXTS:
        ids = _greedy_ids(model, tok, text, 24)
        for end in range(3, len(ids)):
            pair = _decode(tok, ids[:end])[-2:]
            new = pair not in _decode(tok, ids[: end - 1])
            if new and pair.isprintable() and "\ufffd" not in pair:
                return text, ids, pair, end - 1
    raise AssertionError("the tiny model produced no printable pair; add test texts")


def test_stop_string_across_tokens_ends_the_row(model_and_tokenizer, run) -> None:
    model, tok = model_and_tokenizer
    text, ids, stop, last = _printable_stop(model, tok)
    [out] = served(run, model, tok, [BatchRow(tok(text)["input_ids"], None,
                                              SamplingParams(max_new_tokens=24,
                                                             stop=("zzz", stop),
                                                             ignore_eos=True))])
    chunks = out.chunks

    assert out.finish_reason is FinishReason.STOP
    assert list(out.token_ids) == ids[: last + 1]
    full = _decode(tok, ids[: last + 1])
    assert out.text == full[: full.index(stop)]
    assert "".join(c.text for c in chunks) == out.text
    assert sum((c.token_ids for c in chunks), ()) == out.token_ids


def test_streamed_chunks_add_up_to_the_result(model_and_tokenizer, run) -> None:
    model, tok = model_and_tokenizer
    rows = [
        BatchRow(tok(TEXTS[0])["input_ids"], None, SamplingParams(max_new_tokens=20)),
        BatchRow(tok(TEXTS[1])["input_ids"], None,
                 SamplingParams(max_new_tokens=13, temperature=1.0, seed=5, ignore_eos=True)),
        make_row(tok, TEXTS[2], max_new_tokens=7),
    ]

    outs = served(run, model, tok, rows)

    for i, out in enumerate(outs):
        chunks = out.chunks
        assert chunks, f"row {i} streamed nothing"
        assert "".join(c.text for c in chunks) == outs[i].text
        assert sum((c.token_ids for c in chunks), ()) == outs[i].token_ids
        # Streaming is text-identical to decoding the result in one go.
        text_ids = outs[i].token_ids[:-1] if outs[i].finish_reason is FinishReason.EOS \
            else outs[i].token_ids
        assert outs[i].text == tok.decode(text_ids, skip_special_tokens=True)


def test_streamed_chunks_never_split_a_character(llama, run) -> None:
    model, tok = llama
    outs = served(run, model, tok, [
        BatchRow(tok("é€👋" * 4)["input_ids"], None,
                 SamplingParams(max_new_tokens=48, temperature=1.0, seed=s, ignore_eos=True))
        for s in range(4)
    ])
    streams = [out.chunks for out in outs]

    # The byte tokenizer splits every non-ASCII character into 2-4 tokens; random bytes that are
    # not valid UTF-8 end up as U+FFFD in the final text as well. Text is released in whole
    # characters only: after each chunk, the text so far is the decoding of the ids so far
    # less, at most, a partial character still held (which decodes as U+FFFD). The first
    # chunk leaves with the first token, so its text may be empty.
    multibyte = [ch for o in outs for ch in o.text if ord(ch) > 127 and ch != "\ufffd"]
    assert multibyte, "no multi-byte character generated; pick other seeds"
    for chunks, out in zip(streams, outs, strict=True):
        assert "".join(c.text for c in chunks) == out.text
        assert len(chunks[0].token_ids) == 1
        ids: list[int] = []
        text = ""
        for c in chunks:
            ids += c.token_ids
            text += c.text
            decoded = tok.decode(ids, skip_special_tokens=True)
            assert decoded.startswith(text)
            assert set(decoded[len(text):]) <= {"\ufffd"}


def test_abort_stops_only_that_row(llama, run) -> None:
    model, tok = llama
    polls = {"n": 0}

    def aborted_after_three() -> bool:
        polls["n"] += 1
        return polls["n"] > 3

    reference = run_one(model, tok, make_row(tok, TEXTS[0], max_new_tokens=12, ignore_eos=True))
    outs = run(model, tok, [
        BatchRow(tok(TEXTS[1])["input_ids"], None,
                 SamplingParams(max_new_tokens=30, ignore_eos=True),
                 is_aborted=aborted_after_three),
        make_row(tok, TEXTS[0], max_new_tokens=12, ignore_eos=True),
    ])

    assert outs[0].aborted
    assert 1 <= len(outs[0].token_ids) <= 3  # one poll may happen before the first step
    assert not outs[1].aborted
    assert outs[1].token_ids == reference.token_ids


def test_row_aborted_before_start_is_not_generated(llama, run) -> None:
    model, tok = llama
    outs = run(model, tok, [
        BatchRow(tok(TEXTS[0])["input_ids"], None, SamplingParams(), is_aborted=lambda: True),
        make_row(tok, TEXTS[1], max_new_tokens=4, ignore_eos=True),
    ])

    assert outs[0].aborted and outs[0].token_ids == ()
    assert len(outs[1].token_ids) == 4


def test_a_failing_callback_aborts_its_row_not_the_batch(llama, run) -> None:
    model, tok = llama

    def broken(delta: RowDelta) -> None:
        raise RuntimeError("client went away")

    outs = run(model, tok, [
        BatchRow(tok(TEXTS[0])["input_ids"], None,
                 SamplingParams(max_new_tokens=8, ignore_eos=True), on_delta=broken,
                 live=True),
        make_row(tok, TEXTS[1], max_new_tokens=8, ignore_eos=True),
    ])

    assert outs[0].aborted
    assert len(outs[1].token_ids) == 8 and not outs[1].aborted


def test_a_failing_abort_poll_aborts_its_row_not_the_batch(llama, run) -> None:
    model, tok = llama

    def broken() -> bool:
        raise RuntimeError("ticket gone")

    outs = run(model, tok, [
        BatchRow(tok(TEXTS[0])["input_ids"], None, SamplingParams(), is_aborted=broken),
        make_row(tok, TEXTS[1], max_new_tokens=3, ignore_eos=True),
    ])

    assert outs[0].aborted
    assert len(outs[1].token_ids) == 3


def test_a_row_of_only_virtual_tokens_generates(llama, run) -> None:
    model, tok = llama
    soft = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    out = run(model, tok, [BatchRow([], soft, SamplingParams(max_new_tokens=5,
                                                                  ignore_eos=True))])[0]

    assert len(out.token_ids) == 5


def test_first_token_is_reported_once_per_row(llama, run) -> None:
    model, tok = llama
    calls: list[int] = []
    run(model, tok, [
        BatchRow(tok(t)["input_ids"], None, SamplingParams(max_new_tokens=n),
                 on_first_token=lambda i=i: calls.append(i))
        for i, (t, n) in enumerate([(TEXTS[0], 6), (TEXTS[1], 2)])
    ])

    assert sorted(calls) == [0, 1]


def test_no_rows_no_work(llama, run) -> None:
    model, tok = llama

    assert run(model, tok, []) == []


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=0),
    SamplingParams(temperature=-1.0),
    SamplingParams(temperature=float("inf")),
    SamplingParams(top_p=0.0),
    SamplingParams(top_k=-1),
    SamplingParams(temperature=1.0, top_k=10**22),
    SamplingParams(temperature=1.0, seed=2**70),
])
def test_an_invalid_row_fails_alone(llama, params, run) -> None:
    """The bad row is not computed and carries its ValueError; its batch mate is unchanged."""
    model, tok = llama
    good = make_row(tok, "hello there", max_new_tokens=4, ignore_eos=True)
    alone = run(model, tok, [good])[0]

    bad, mate = run(model, tok, [BatchRow([1, 5], None, params), good])

    assert bad.aborted and isinstance(bad.error, ValueError) and bad.token_ids == ()
    assert mate.error is None and not mate.aborted
    assert mate.token_ids == alone.token_ids


def test_empty_prompt_without_soft_prompt_fails_alone(llama, run) -> None:
    model, tok = llama
    good, empty = run(model, tok, [make_row(tok, "x", max_new_tokens=2),
                                   BatchRow([], None, SamplingParams())])
    assert good.error is None and len(good.token_ids) == 2
    assert isinstance(empty.error, ValueError) and "no prompt tokens" in str(empty.error)


def test_model_generation_config_is_restored(llama) -> None:
    model, tok = llama
    original = model.generation_config

    run_batch(model, tok, [make_row(tok, "x", max_new_tokens=2)])

    assert model.generation_config is original
