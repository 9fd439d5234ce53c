"""Per-row parameters inside one batch: sampling, stopping, eos, streaming, abort."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
from transformers import AutoTokenizer

from server.engine.generation import BatchRow, RowOutput, run_batch
from server.engine.interface import FinishReason, SamplingParams, TokenChunk
from server.engine.sampling import PerRowLogitsProcessor
from tests.factories import load_base

EOS = 2
TEXTS = ("Tweet: I love it. Label:", "a", "The quick brown fox", "Hi")


# -- the logits processor alone -------------------------------------------------------------


def _processor(*params: SamplingParams, finished: list[bool] | None = None):
    return PerRowLogitsProcessor(list(params), eos_ids=[EOS],
                                 finished=finished or [False] * len(params),
                                 device=torch.device("cpu"))


def _draws(params: SamplingParams, logits: list[float], n: int) -> Counter:
    proc = _processor(params)
    ids = torch.zeros(1, 0, dtype=torch.long)
    counts: Counter = Counter()
    for _ in range(n):
        out = proc(ids, torch.tensor([logits]))
        counts[int(out.argmax())] += 1
    return counts


def test_greedy_rows_are_untouched_and_sampled_rows_become_one_hot() -> None:
    proc = _processor(SamplingParams(), SamplingParams(temperature=1.0, seed=0))
    scores = torch.randn(2, 10)

    out = proc(torch.zeros(2, 0, dtype=torch.long), scores.clone())

    assert torch.equal(out[0], scores[0])
    assert (out[1] == 0).sum() == 1
    assert torch.isinf(out[1]).sum() == 9


def test_ignore_eos_masks_eos_only_for_its_row() -> None:
    proc = _processor(SamplingParams(ignore_eos=True), SamplingParams())
    scores = torch.zeros(2, 5)
    scores[:, EOS] = 10.0

    out = proc(torch.zeros(2, 0, dtype=torch.long), scores)

    assert out[0, EOS] == float("-inf")
    assert out[1, EOS] == 10.0


def test_finished_rows_are_not_sampled() -> None:
    proc = _processor(SamplingParams(temperature=1.0, seed=0), finished=[True])
    scores = torch.randn(1, 10)

    assert torch.equal(proc(torch.zeros(1, 0, dtype=torch.long), scores.clone()), scores)


def test_sampling_follows_the_distribution() -> None:
    probs = torch.tensor([0.5, 0.3, 0.2])
    counts = _draws(SamplingParams(temperature=1.0, seed=7), probs.log().tolist(), 3000)

    for token, p in enumerate(probs.tolist()):
        assert abs(counts[token] / 3000 - p) < 0.04


def test_top_k_keeps_only_the_k_best() -> None:
    logits = [0.0, 3.0, 1.0, 2.0, -1.0]
    counts = _draws(SamplingParams(temperature=5.0, top_k=2, seed=1), logits, 400)

    assert set(counts) == {1, 3}


def test_top_p_keeps_the_smallest_set_reaching_p() -> None:
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log().tolist()

    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.7, seed=2), logits, 400)) == {0, 1}
    assert set(_draws(SamplingParams(temperature=1.0, top_p=0.45, seed=2), logits, 100)) == {0}


def test_top_p_is_exact_when_the_nucleus_is_wider_than_the_candidate_list() -> None:
    vocab = 4000  # a flat distribution: the 0.5 nucleus holds ~1900 tokens, more than 1024
    logits = -torch.arange(vocab, dtype=torch.float32) * 1e-4
    probs = torch.softmax(logits, dim=-1)
    nucleus = int((torch.cumsum(probs, dim=-1) - probs < 0.5).sum())

    counts = _draws(SamplingParams(temperature=1.0, top_p=0.5, seed=4), logits.tolist(), 100)

    assert max(counts) < nucleus
    assert max(counts) >= 1024


def test_rows_with_different_top_k_and_top_p_share_a_step() -> None:
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]] * 3)
    params = [SamplingParams(temperature=3.0, top_k=1, seed=0),
              SamplingParams(temperature=3.0, top_k=2, seed=0),
              SamplingParams(temperature=3.0, top_p=0.999, seed=0)]
    proc = _processor(*params)
    seen: list[set[int]] = [set(), set(), set()]
    for _ in range(300):
        out = proc(torch.zeros(3, 0, dtype=torch.long), logits.clone())
        for i, token in enumerate(out.argmax(dim=-1).tolist()):
            seen[i].add(token)

    assert seen == [{0}, {0, 1}, {0, 1, 2, 3, 4}]


def test_near_zero_temperature_is_greedy() -> None:
    counts = _draws(SamplingParams(temperature=1e-4, seed=3), [0.1, 0.3, 0.2], 50)

    assert counts == Counter({1: 50})


# -- run_batch on a real tiny model ---------------------------------------------------------


@pytest.fixture(params=["llama", "t5"])
def model_and_tokenizer(request, tiny_model_dirs):
    model_dir = tiny_model_dirs[request.param]
    return load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture
def llama(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    return load_base(model_dir), AutoTokenizer.from_pretrained(model_dir)


def _row(tokenizer, text: str, **params) -> BatchRow:
    return BatchRow(tokenizer(text)["input_ids"], None, SamplingParams(**params))


def _one(model, tokenizer, row: BatchRow) -> RowOutput:
    return run_batch(model, tokenizer, [row])[0]


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    hidden = model.get_input_embeddings().weight.shape[1]
    soft = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    sampled = [
        BatchRow(tok(TEXTS[0])["input_ids"], soft,
                 SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)),
        _row(tok, TEXTS[2], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=12),
        _row(tok, TEXTS[1], max_new_tokens=9, temperature=1.3, top_k=20, seed=13),
    ]
    mates = [_row(tok, TEXTS[3], max_new_tokens=14),
             _row(tok, TEXTS[1], max_new_tokens=5, temperature=1.0, seed=99)]

    alone = [_one(model, tok, r) for r in sampled]
    batched = run_batch(model, tok, [mates[0], sampled[0], sampled[1], mates[1], sampled[2]])

    assert [o.token_ids for o in alone] == [batched[i].token_ids for i in (1, 2, 4)]


def test_different_seeds_give_different_samples(llama) -> None:
    model, tok = llama
    outs = run_batch(model, tok, [
        _row(tok, TEXTS[0], max_new_tokens=16, temperature=1.0, seed=s) for s in (1, 2, 3)
    ])

    assert len({o.token_ids for o in outs}) == 3


def test_top_k_one_is_greedy(llama) -> None:
    model, tok = llama
    greedy, top1 = run_batch(model, tok, [
        _row(tok, TEXTS[0], max_new_tokens=12),
        _row(tok, TEXTS[0], max_new_tokens=12, temperature=1.0, top_k=1),
    ])

    assert greedy.token_ids == top1.token_ids


def test_each_row_stops_at_its_own_max_new_tokens(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    outs = run_batch(model, tok, [
        _row(tok, TEXTS[0], max_new_tokens=3, ignore_eos=True),
        _row(tok, TEXTS[0], max_new_tokens=11, ignore_eos=True),
        _row(tok, TEXTS[1], max_new_tokens=1, ignore_eos=True, temperature=1.0, seed=0),
    ])

    assert [len(o.token_ids) for o in outs] == [3, 11, 1]
    assert all(o.finish_reason is FinishReason.LENGTH for o in outs)
    assert outs[0].token_ids == outs[1].token_ids[:3]


def _greedy_ids(model, tok, text: str, n: int) -> list[int]:
    return list(_one(model, tok, _row(tok, text, max_new_tokens=n, ignore_eos=True)).token_ids)


def test_eos_finishes_the_row_unless_ignore_eos(llama) -> None:
    model, tok = llama
    ids = _greedy_ids(model, tok, TEXTS[0], 16)
    k = next(i for i in range(2, 16) if ids[i] not in ids[:i])  # a token first seen at step k
    model.generation_config.eos_token_id = ids[k]  # the model now "ends" there

    stops, ignores = run_batch(model, tok, [
        _row(tok, TEXTS[0], max_new_tokens=16),
        _row(tok, TEXTS[0], max_new_tokens=16, ignore_eos=True),
    ])

    assert stops.finish_reason is FinishReason.EOS
    assert list(stops.token_ids) == ids[: k + 1]  # the eos id included
    assert stops.text == tok.decode(ids[:k], skip_special_tokens=True)  # but not its text
    assert ignores.finish_reason is FinishReason.LENGTH
    assert len(ignores.token_ids) == 16
    assert ids[k] not in ignores.token_ids


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


def test_stop_string_across_tokens_ends_the_row(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    text, ids, stop, last = _printable_stop(model, tok)
    chunks: list[TokenChunk] = []

    out = _one(model, tok, BatchRow(tok(text)["input_ids"], None,
                                    SamplingParams(max_new_tokens=24, stop=("zzz", stop),
                                                   ignore_eos=True),
                                    on_chunk=chunks.append))

    assert out.finish_reason is FinishReason.STOP
    assert list(out.token_ids) == ids[: last + 1]
    full = _decode(tok, ids[: last + 1])
    assert out.text == full[: full.index(stop)]
    assert "".join(c.text for c in chunks) == out.text
    assert sum((c.token_ids for c in chunks), ()) == out.token_ids


def test_streamed_chunks_add_up_to_the_result(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    streams: dict[int, list[TokenChunk]] = {0: [], 1: []}
    rows = [
        BatchRow(tok(TEXTS[0])["input_ids"], None, SamplingParams(max_new_tokens=20),
                 on_chunk=streams[0].append),
        BatchRow(tok(TEXTS[1])["input_ids"], None,
                 SamplingParams(max_new_tokens=13, temperature=1.0, seed=5, ignore_eos=True),
                 on_chunk=streams[1].append),
        _row(tok, TEXTS[2], max_new_tokens=7),
    ]

    outs = run_batch(model, tok, rows)

    for i, chunks in streams.items():
        assert chunks, f"row {i} streamed nothing"
        assert "".join(c.text for c in chunks) == outs[i].text
        assert sum((c.token_ids for c in chunks), ()) == outs[i].token_ids
        # Streaming is text-identical to decoding the result in one go.
        text_ids = outs[i].token_ids[:-1] if outs[i].finish_reason is FinishReason.EOS \
            else outs[i].token_ids
        assert outs[i].text == tok.decode(text_ids, skip_special_tokens=True)


def test_streamed_chunks_never_split_a_character(llama) -> None:
    model, tok = llama
    streams: list[list[TokenChunk]] = [[] for _ in range(4)]
    outs = run_batch(model, tok, [
        BatchRow(tok("é€👋" * 4)["input_ids"], None,
                 SamplingParams(max_new_tokens=48, temperature=1.0, seed=s, ignore_eos=True),
                 on_chunk=streams[s].append)
        for s in range(4)
    ])

    # The byte tokenizer splits every non-ASCII character into 2-4 tokens; random bytes that are
    # not valid UTF-8 end up as U+FFFD in the final text as well. A chunk must hold only whole
    # characters, i.e. decode to exactly its own text.
    multibyte = [ch for o in outs for ch in o.text if ord(ch) > 127 and ch != "\ufffd"]
    assert multibyte, "no multi-byte character generated; pick other seeds"
    for chunks, out in zip(streams, outs, strict=True):
        assert "".join(c.text for c in chunks) == out.text
        for c in chunks:
            assert c.text == tok.decode(list(c.token_ids), skip_special_tokens=True)


def test_abort_stops_only_that_row(llama) -> None:
    model, tok = llama
    polls = {"n": 0}

    def aborted_after_three() -> bool:
        polls["n"] += 1
        return polls["n"] > 3

    reference = _one(model, tok, _row(tok, TEXTS[0], max_new_tokens=12, ignore_eos=True))
    outs = run_batch(model, tok, [
        BatchRow(tok(TEXTS[1])["input_ids"], None,
                 SamplingParams(max_new_tokens=30, ignore_eos=True),
                 is_aborted=aborted_after_three),
        _row(tok, TEXTS[0], max_new_tokens=12, ignore_eos=True),
    ])

    assert outs[0].aborted
    assert 1 <= len(outs[0].token_ids) <= 3  # one poll may happen before the first step
    assert not outs[1].aborted
    assert outs[1].token_ids == reference.token_ids


def test_row_aborted_before_start_is_not_generated(llama) -> None:
    model, tok = llama
    outs = run_batch(model, tok, [
        BatchRow(tok(TEXTS[0])["input_ids"], None, SamplingParams(), is_aborted=lambda: True),
        _row(tok, TEXTS[1], max_new_tokens=4, ignore_eos=True),
    ])

    assert outs[0].aborted and outs[0].token_ids == ()
    assert len(outs[1].token_ids) == 4


def test_a_failing_callback_aborts_its_row_not_the_batch(llama) -> None:
    model, tok = llama

    def broken(chunk: TokenChunk) -> None:
        raise RuntimeError("client went away")

    outs = run_batch(model, tok, [
        BatchRow(tok(TEXTS[0])["input_ids"], None,
                 SamplingParams(max_new_tokens=8, ignore_eos=True), on_chunk=broken),
        _row(tok, TEXTS[1], max_new_tokens=8, ignore_eos=True),
    ])

    assert outs[0].aborted
    assert len(outs[1].token_ids) == 8 and not outs[1].aborted


def test_a_failing_abort_poll_aborts_its_row_not_the_batch(llama) -> None:
    model, tok = llama

    def broken() -> bool:
        raise RuntimeError("ticket gone")

    outs = run_batch(model, tok, [
        BatchRow(tok(TEXTS[0])["input_ids"], None, SamplingParams(), is_aborted=broken),
        _row(tok, TEXTS[1], max_new_tokens=3, ignore_eos=True),
    ])

    assert outs[0].aborted
    assert len(outs[1].token_ids) == 3


def test_a_row_of_only_virtual_tokens_generates(llama) -> None:
    model, tok = llama
    soft = torch.randn(4, model.config.hidden_size, generator=torch.Generator().manual_seed(1))

    out = run_batch(model, tok, [BatchRow([], soft, SamplingParams(max_new_tokens=5,
                                                                  ignore_eos=True))])[0]

    assert len(out.token_ids) == 5


def test_first_token_is_reported_once_per_row(llama) -> None:
    model, tok = llama
    calls: list[int] = []
    run_batch(model, tok, [
        BatchRow(tok(t)["input_ids"], None, SamplingParams(max_new_tokens=n),
                 on_first_token=lambda i=i: calls.append(i))
        for i, (t, n) in enumerate([(TEXTS[0], 6), (TEXTS[1], 2)])
    ])

    assert sorted(calls) == [0, 1]


def test_no_rows_no_work(llama) -> None:
    model, tok = llama

    assert run_batch(model, tok, []) == []


@pytest.mark.parametrize("params", [
    SamplingParams(max_new_tokens=0),
    SamplingParams(temperature=-1.0),
    SamplingParams(top_p=0.0),
    SamplingParams(top_k=-1),
])
def test_invalid_parameters_are_rejected(llama, params) -> None:
    model, tok = llama
    with pytest.raises(ValueError):
        run_batch(model, tok, [BatchRow([1, 5], None, params)])


def test_empty_prompt_without_soft_prompt_is_rejected(llama) -> None:
    model, tok = llama
    with pytest.raises(ValueError, match="row 1"):
        run_batch(model, tok, [_row(tok, "x"), BatchRow([], None, SamplingParams())])


def test_model_generation_config_is_restored(llama) -> None:
    model, tok = llama
    original = model.generation_config

    run_batch(model, tok, [_row(tok, "x", max_new_tokens=2)])

    assert model.generation_config is original
