"""Per-row sampling in one batch: temperature, top-k, top-p; seeds independent of batch mates and
of the runner (the engine core and static batching share one sampler)."""

from __future__ import annotations

from collections import Counter

import torch

from server.engine.generation import run_batch
from server.engine.interface import SamplingParams
from server.engine.rows import BatchRow
from server.engine.sampling import PerRowLogitsProcessor
from tests.engine.conftest import make_row, run_core, run_one

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


def test_min_tokens_masks_eos_and_stop_ids_only_for_its_row_and_only_until_then() -> None:
    proc = _processor(SamplingParams(min_tokens=2, stop_token_ids=(3,)),
                      SamplingParams(ignore_eos=True, stop_token_ids=(3,)))
    scores = torch.zeros(2, 5)
    scores[:, EOS] = scores[:, 3] = 10.0
    ids = torch.zeros(2, 0, dtype=torch.long)

    for _ in range(2):
        out = proc(ids, scores.clone())
        assert out[0, EOS] == out[0, 3] == float("-inf")
        assert out[1, EOS] == out[1, 3] == 10.0  # ignore_eos masks nothing: eos may be drawn
    out = proc(ids, scores.clone())
    assert out[0, EOS] == out[0, 3] == 10.0


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


# -- run_batch (and the engine core) on a real tiny model -----------------------------------------


def test_seeded_sampling_is_the_same_alone_and_in_a_batch(model_and_tokenizer) -> None:
    model, tok = model_and_tokenizer
    hidden = model.get_input_embeddings().weight.shape[1]
    soft = torch.randn(3, hidden, generator=torch.Generator().manual_seed(0))
    sampled = [
        BatchRow(tok(TEXTS[0])["input_ids"], soft,
                 SamplingParams(max_new_tokens=12, temperature=1.0, seed=11)),
        make_row(tok, TEXTS[2], max_new_tokens=10, temperature=0.8, top_p=0.9, seed=12),
        make_row(tok, TEXTS[1], max_new_tokens=9, temperature=1.3, top_k=20, seed=13),
    ]
    mates = [make_row(tok, TEXTS[3], max_new_tokens=14),
             make_row(tok, TEXTS[1], max_new_tokens=5, temperature=1.0, seed=99)]

    alone = [run_one(model, tok, r) for r in sampled]
    batched = run_batch(model, tok, [mates[0], sampled[0], sampled[1], mates[1], sampled[2]])

    assert [o.token_ids for o in alone] == [batched[i].token_ids for i in (1, 2, 4)]
    if not model.config.is_encoder_decoder:  # the engine core: its own draws, as isolated
        core_alone = [run_core(model, tok, [r])[0] for r in sampled]
        joined = run_core(model, tok, [mates[0], sampled[0], sampled[1], mates[1], sampled[2]],
                          max_batch_tokens=8)
        assert [o.token_ids for o in core_alone] == [joined[i].token_ids for i in (1, 2, 4)]
        # One sampler: a seed draws the same tokens whichever runner runs the row.
        assert [o.token_ids for o in core_alone] == [o.token_ids for o in alone]


def test_different_seeds_give_different_samples(llama) -> None:
    model, tok = llama
    outs = run_batch(model, tok, [
        make_row(tok, TEXTS[0], max_new_tokens=16, temperature=1.0, seed=s) for s in (1, 2, 3)
    ])

    assert len({o.token_ids for o in outs}) == 3


def test_top_k_one_is_greedy(llama) -> None:
    model, tok = llama
    greedy, top1 = run_batch(model, tok, [
        make_row(tok, TEXTS[0], max_new_tokens=12),
        make_row(tok, TEXTS[0], max_new_tokens=12, temperature=1.0, top_k=1),
    ])

    assert greedy.token_ids == top1.token_ids


# -- a row whose sampling fails --------------------------------------------------------------


def test_isolated_sampling_fails_only_the_bad_row_and_keeps_the_others_draws() -> None:
    """A top_k no tensor can hold fails the batched draw; the other rows get the tokens they
    would have had without the bad row, and the bad row is reported by its index."""
    scores = torch.randn(3, 50, generator=torch.Generator().manual_seed(1))
    good = [SamplingParams(temperature=1.0, seed=5), SamplingParams(temperature=0.7, top_k=9,
                                                                     seed=6)]
    bad = SamplingParams(temperature=1.0, top_k=10**22, seed=7)
    ids = torch.zeros(2, 0, dtype=torch.long)
    expected = _processor(*good)(ids, scores[[0, 2]].clone()).argmax(dim=-1)
    failed: dict[int, Exception] = {}
    mixed = PerRowLogitsProcessor([good[0], bad, good[1]], eos_ids=[EOS],
                                  finished=[False] * 3, device=torch.device("cpu"),
                                  on_error=failed.__setitem__)

    tokens = mixed(torch.zeros(3, 0, dtype=torch.long), scores.clone()).argmax(dim=-1)

    assert list(failed) == [1] and isinstance(failed[1], Exception)
    assert tokens[[0, 2]].tolist() == expected.tolist()


def test_a_row_whose_sampling_fails_mid_batch_fails_alone(llama, monkeypatch) -> None:
    """With the parameter checks out of the way (the API and the engine both check first),
    a row whose sampling raises under static batching leaves with its error; its seeded batch
    mate's tokens are the ones it gets alone. (The engine core samples every row in one device
    call: there the checks at submit and at EngineCore.add are what keeps a row out.)"""
    model, tok = llama
    run = run_batch
    mate = make_row(tok, TEXTS[0], max_new_tokens=6, temperature=1.0, seed=3, ignore_eos=True)
    alone = run(model, tok, [mate])[0]
    monkeypatch.setattr("server.engine.rows.validate_params", lambda params: None)
    bad = make_row(tok, TEXTS[2], max_new_tokens=6, temperature=1.0, top_k=10**22)

    failed, ok = run(model, tok, [bad, mate])

    assert failed.aborted and failed.error is not None
    assert ok.error is None and ok.token_ids == alone.token_ids
