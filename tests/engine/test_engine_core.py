"""The engine core against the definition: PEFT's get_prompt rows placed before the text's
embeddings, decoded greedily by full recomputation in float32, token for token.

Rows of different adapters (and bare rows) run in one step, as reserved ids through the
wrapped input embedding; prompts are cut into chunks by a small token budget, rows join while
others decode, fewer slots than rows make rows wait, and some rows are preempted mid-output and
recomputed.
"""

from __future__ import annotations

import gc
import weakref
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer

from adapters_store import LocalAdapterStore
from server.config import Device, Settings
from server.engine.core.decode_graphs import row_bucket, width_bucket
from server.engine.core.kv_cache import CacheShape, SlotKVCache
from server.engine.core.loop import _probe as probe
from server.engine.engine import Engine
from server.engine.interface import FinishReason, SamplingParams
from server.engine.rows import BatchRow, InvalidRowError
from tests.engine.conftest import make_core
from tests.engine.test_engine import request
from tests.factories import greedy_by_recomputation, load_base, make_adapter, peft_prompt

DECODERS = ("gpt2", "llama", "qwen2")
ADAPTERS = (("prompt_tuning", 3, 1), ("p_tuning_mlp", 9, 2), ("p_tuning_lstm", 5, 3))
TEXTS = ("Tweet: I love it. Label:", "a", "The quick brown fox jumps over the lazy dog",
         "Résumé: naïve café ☕")
# (text, adapter index or None, max_new_tokens)
REQUESTS = ((0, 0, 12), (1, 1, 9), (2, 2, 14), (3, None, 10), (2, 0, 8), (0, 1, 13),
            (1, None, 7), (3, 2, 11), (0, 2, 6), (2, 1, 10))


def _peft_prompts(model_dir: Path, root: Path) -> list[torch.Tensor]:
    """Each adapter's rows as PEFT's get_prompt gives them (the definition's prompt)."""
    return [peft_prompt(model_dir, make_adapter(model_dir, root / f"a{i}", kind,
                                                num_virtual_tokens=n, seed=seed))
            for i, (kind, n, seed) in enumerate(ADAPTERS)]


def _core(model, tokenizer, *, slots: int, budget: int, table_bytes: int = 1 << 20,
          device: str = "cpu", **kw):
    return make_core(model, tokenizer, slots=slots, max_batch_tokens=budget,
                     table_bytes=table_bytes, **kw)


# Decode steps as they run on CUDA (padded to row and width buckets, a scratch slot for the
# padding rows), and with a capture that fails (no CUDA here): every bucket falls back to eager.
DECODE_MODES = {"exact": {}, "padded": {"pad_decodes": True},
                "capture-fails": {"graphs": True}, "cuda-graphs": {"device": "cuda"},
                # Soft prompts shared through a prefix cache too small for all three
                # adapters (3 + 9 + 5 tokens): rows hit, miss, and evict each other's.
                "prefix": {"prefix_tokens": 14}}
CUDA = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]
CASES = [*((arch, "exact") for arch in DECODERS), ("llama", "padded"),
         *((arch, "prefix") for arch in DECODERS),
         ("gpt2", "capture-fails"),
         *(pytest.param(arch, "cuda-graphs", marks=CUDA) for arch in DECODERS)]


@pytest.mark.parametrize(("arch", "decode"), CASES)
def test_mixed_steps_match_the_definition(arch, decode, tiny_model_dirs, tmp_path, caplog):
    model_dir = tiny_model_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = _peft_prompts(model_dir, tmp_path)
    reference = load_base(model_dir)
    mode = DECODE_MODES[decode]
    model = load_base(model_dir).to(mode.get("device", "cpu"))
    prompts_on = [p.to(mode.get("device", "cpu")) for p in prompts]
    table, core = _core(model, tokenizer, slots=4, budget=16, **mode)
    entries = [table.insert("t", f"a{i}", "v1", p) for i, p in enumerate(prompts_on)]

    outputs: dict[int, object] = {}
    pending = list(enumerate(REQUESTS))
    joins = [3, 0, 2, 1, 0, 0, 2]
    preempted = False
    prefill_steps = 0
    for step in range(400):
        take = joins.pop(0) if joins else len(pending)
        for i, (text, adapter, n) in pending[:take]:
            text_ids = tokenizer(TEXTS[text])["input_ids"]
            virtual = () if adapter is None else entries[adapter].ids
            row = BatchRow(text_ids, None, SamplingParams(max_new_tokens=n))
            assert core.add(i, row, [*virtual, *text_ids]) is None
        pending = pending[take:]
        if step == 6 and len(core.running) >= 2:  # two rows lose their slot mid-output ...
            parked = core.preempt([r.handle for r in core.running if r.drawn][:2])
            preempted = len(parked) == 2
        if step == 9:  # ... and are recomputed from their ids a few steps later
            core.resume(parked)
        outputs.update(core.step())
        prefill_steps += core.last.decodes > 0 and core.last.prefill_tokens > 0
        assert core.last.decodes + core.last.prefill_tokens <= 16
        if not pending and not len(core):
            break
    assert preempted and prefill_steps > 0  # decodes and prefill chunks shared forwards
    assert sorted(outputs) == list(range(len(REQUESTS)))
    distinct = set()
    for i, (text, adapter, n) in enumerate(REQUESTS):
        text_ids = tokenizer(TEXTS[text])["input_ids"]
        expected = greedy_by_recomputation(reference, None if adapter is None else prompts[adapter],
                               text_ids, n)
        out = outputs[i]
        assert not out.aborted, out.error
        assert list(out.token_ids) == expected, f"{arch} request {i}"
        eos = expected[-1] == reference.generation_config.eos_token_id
        assert out.finish_reason is (FinishReason.EOS if eos else FinishReason.LENGTH)
        distinct.add(tuple(expected))
    assert len(distinct) > 3  # a degenerate model would make this vacuous
    assert core.kv.free_slots == 4
    if decode == "prefix":
        stats = core.prefixes.stats()
        assert stats.hits > 0 and stats.misses > 0 and stats.evictions > 0, stats
        assert stats.tokens_saved > 0 and stats.used_tokens <= 14
    else:
        assert core.prefixes is None
    graphs = core.decode_graphs
    if decode in ("exact", "prefix"):
        assert graphs is None
    elif decode == "capture-fails":
        assert graphs.eager_buckets and graphs.captured == 0
        assert "CUDA graph capture failed" in caplog.text
    elif decode == "cuda-graphs":  # decode steps were replayed from captured graphs
        assert graphs.captured > 0 and not graphs.eager_buckets, caplog.text


@pytest.mark.parametrize("arch", DECODERS)
def test_shared_prefixes_serve_only_their_adapter_version(arch, tiny_model_dirs, tmp_path):
    """A row that joins after its adapter's prefix was computed prefills only its text; rows
    that join together all compute it; an overwritten adapter (new rows, new ids) never gets
    the old keys and values; a prompt of virtual tokens only still computes its last token."""
    model_dir = tiny_model_dirs[arch]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    prompts = _peft_prompts(model_dir, tmp_path)
    reference = load_base(model_dir)
    table, core = _core(load_base(model_dir), tokenizer, slots=4, budget=64, prefix_tokens=64)
    first = table.insert("t", "a", "v1", prompts[1])  # 9 virtual tokens

    def run(*rows: tuple[tuple[int, ...], str]) -> list[list[int]]:
        handles = []
        for virtual, text in rows:
            ids = tokenizer(text)["input_ids"] if text else []
            handles.append(len(handles))
            prompt = [*virtual, *ids]  # as the engine's loops build rows
            assert core.add(handles[-1], BatchRow(prompt, None, SamplingParams(max_new_tokens=6)),
                            prompt) is None
        done: dict[int, list[int]] = {}
        while len(core):
            done.update({h: list(out.token_ids) for h, out in core.step()})
        return [done[h] for h in handles]

    def expected(prompt: torch.Tensor, text: str) -> list[int]:
        ids = tokenizer(text)["input_ids"] if text else []
        return greedy_by_recomputation(reference, prompt, ids, 6)

    together = run((first.ids, TEXTS[0]), (first.ids, TEXTS[2]))  # both compute the prefix
    assert together == [expected(prompts[1], TEXTS[0]), expected(prompts[1], TEXTS[2])]
    stats = core.prefixes.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.used_tokens) == (0, 2, 1, 9)

    assert run((first.ids, TEXTS[1])) == [expected(prompts[1], TEXTS[1])]  # from the cache
    assert run((first.ids, "")) == [expected(prompts[1], "")]  # 8 shared, the 9th computed
    stats = core.prefixes.stats()
    assert (stats.hits, stats.tokens_saved) == (2, 9 + 8)

    table.invalidate("t", "a")  # overwritten: the new version has other rows and ids
    table.release(first)
    second = table.insert("t", "a", "v2", prompts[2])
    assert not set(second.ids) & set(first.ids)
    assert run((second.ids, TEXTS[1])) == [expected(prompts[2], TEXTS[1])]
    assert core.prefixes.stats().misses == 3


def test_seeded_rows_draw_the_same_whatever_shares_the_step(tiny_model_dirs):
    model_dir = tiny_model_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base(model_dir)
    _, core = _core(model, tokenizer, slots=8, budget=64)
    ids = tokenizer("Once upon a time")["input_ids"]

    def params(seed: int) -> SamplingParams:
        return SamplingParams(max_new_tokens=12, temperature=1.3, top_k=40, top_p=0.95,
                              seed=seed, ignore_eos=True)

    def run(rows: list[tuple[int, list[int], SamplingParams]]) -> dict[int, tuple[int, ...]]:
        for handle, prompt, p in rows:
            core.add(handle, BatchRow(prompt, None, p), prompt)
        done = {}
        while len(core):
            done.update({h: out.token_ids for h, out in core.step()})
        return done

    alone = run([(0, ids, params(7))])[0]
    others = [(h, tokenizer(t)["input_ids"], params(100 + h))
              for h, t in enumerate(["x", "hello there", "abc def ghi", "z" * 20], start=1)]
    crowded = run([*others[:2], (0, ids, params(7)), *others[2:]])[0]
    assert alone == crowded
    assert run([(0, ids, params(8))])[0] != alone  # the seed matters


def test_a_row_that_cannot_fit_its_slot_is_refused_alone(tiny_model_dirs):
    model_dir = tiny_model_dirs["gpt2"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    _, core = _core(load_base(model_dir), tokenizer, slots=2, budget=32)
    out = core.add(0, BatchRow([1] * 100, None, SamplingParams(max_new_tokens=64)), [1] * 100)
    assert out is not None and isinstance(out.error, InvalidRowError)
    assert "128 positions" in str(out.error)
    assert len(core) == 0


def test_buckets_cover_every_row_count_and_width():
    assert [row_bucket(n, 64) for n in (1, 2, 3, 5, 16, 17, 25, 64, 70)] == [
        1, 2, 4, 8, 16, 24, 32, 64, 64]
    assert [width_bucket(n, 1000) for n in (1, 64, 65, 300, 999)] == [64, 64, 128, 512, 1000]


def test_the_startup_probe_accepts_a_core_that_keeps_a_scratch_slot(tiny_model_dirs):
    """On CUDA decode steps are padded and keep a scratch slot out of use for good: the probe
    that decides between the core and static batching must not count it as a leaked slot."""
    model_dir = tiny_model_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base(model_dir)
    _, core = _core(model, tokenizer, slots=3, budget=32, pad_decodes=True)
    free = core.kv.free_slots
    assert free == core.kv.slots - 1  # the scratch slot
    probe(core, model.config.vocab_size)
    assert core.kv.free_slots == free and core.kv.calls > 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("cuda_graphs", [True, False])
async def test_the_server_runs_the_core_with_captured_graphs_on_cuda(cuda_graphs,
                                                                     tiny_model_dirs, tmp_path):
    """Startup as the server does it on a GPU: the core (not static batching) serves, every
    decode bucket is captured before the first request (none with --no-cuda-graphs), and the
    output is the definition's."""
    settings = Settings(model=str(tiny_model_dirs["llama"]), store=str(tmp_path / "store"),
                        model_cache=tmp_path / "model-cache", device=Device.CUDA,
                        dtype="float32", max_batch_size=8, cuda_graphs=cuda_graphs)
    eng = Engine(settings, LocalAdapterStore(settings.store))
    eng.start()
    eng.wait_until_ready(120)
    try:
        core = eng._runtime.core.scheduler.core
        assert core is not None
        graphs = core.decode_graphs
        if cuda_graphs:
            # Every bucket at startup: 8 rows -> 1, 2, 4, 8; 512 positions -> 64 ... 512.
            assert graphs is not None and graphs.captured == 16 and not graphs.eager_buckets
        else:
            assert graphs is None
        results = [await eng.generate(request(eng, text, None, max_new_tokens=12))
                   for text in TEXTS]
        if cuda_graphs:
            assert graphs.captured == 16 and not graphs.eager_buckets
        reference = load_base(tiny_model_dirs["llama"])
        tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
        for text, result in zip(TEXTS, results, strict=True):
            expected = greedy_by_recomputation(reference, None, tokenizer(text)["input_ids"], 12)
            assert list(result.token_ids) == expected, text
    finally:
        await eng.aclose(10)


def test_a_cache_given_up_is_freed_though_transformers_keeps_its_attention_registered():
    """A core given up at startup (the model then runs static batching) must not keep its KV
    memory: on a GPU that is most of the device."""
    cache = SlotKVCache(CacheShape(layers=2, kv_heads=2, head_dim=8), slots=2, max_len=8,
                        dtype=torch.float32, device="cpu")
    released = weakref.ref(cache)
    del cache
    gc.collect()
    assert released() is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_capture_that_fails_part_way_leaves_the_stream_as_it_was_and_runs_eagerly(
        tiny_model_dirs, caplog):
    """A forward that syncs with the host cannot be captured: the capture fails after it
    began. The engine thread must be back on its own stream, the bucket and every later one
    eager, and the output still right."""
    model_dir = tiny_model_dirs["llama"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = load_base(model_dir).to("cuda")
    _, core = _core(model, tokenizer, slots=4, budget=64, device="cuda")
    graphs = core.decode_graphs
    forward = graphs._forward

    def syncing(ids, positions):
        if torch.cuda.is_current_stream_capturing():
            ids.sum().item()  # illegal while capturing
        return forward(ids, positions)

    graphs._forward = syncing
    stream = torch.cuda.current_stream()
    ids = tokenizer(TEXTS[0])["input_ids"]
    assert core.add(0, BatchRow(ids, None, SamplingParams(max_new_tokens=12)), ids) is None
    out = {}
    while len(core):
        out.update(core.step())
    assert torch.cuda.current_stream() == stream
    assert graphs.captured == 0 and graphs.eager_buckets and not graphs.capture
    assert "every bucket not captured yet" in caplog.text
    reference = load_base(model_dir)
    assert list(out[0].token_ids) == greedy_by_recomputation(reference, None, ids, 12)


def test_capture_all_visits_every_bucket_largest_first_with_padding_rows_only(
        tiny_model_dirs, monkeypatch):
    """At startup every (rows, width) bucket is captured with the buffers holding padding rows
    alone (they write and read the scratch slot), the largest first. The capture itself needs
    CUDA; here each call records what it would capture."""
    model_dir = tiny_model_dirs["llama"]
    _, core = _core(load_base(model_dir), AutoTokenizer.from_pretrained(model_dir), slots=5,
                    budget=32, pad_decodes=True, max_len=200)
    graphs = core.decode_graphs
    graphs.capture = True
    seen = []

    def capture(key):
        rows = key[0]
        scratch = graphs._scratch
        assert graphs._slots[:rows].tolist() == [scratch] * rows
        assert graphs._write[:rows].tolist() == [scratch * 200] * rows
        assert graphs._lengths[:rows].tolist() == [1] * rows
        seen.append(key)

    monkeypatch.setattr(graphs, "_try_capture", capture)
    graphs.capture_all()
    assert seen == [(r, w) for r in (5, 4, 2, 1) for w in (200, 128, 64)]
