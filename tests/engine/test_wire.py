"""server.engine.wire: what crosses the pipe to the engine process (--engine-process).

Everything is checked after a real dumps/loads trip, so a value that is not JSON-clean fails
here rather than in a child process.
"""

from __future__ import annotations

import inspect
import json
from typing import Any

import pytest

import adapters_store.errors as store_errors
import server.engine.errors as engine_errors
from adapters_store.records import AdapterRecord, PeftType, TaskType
from server.engine import wire
from server.engine.chat import ChatTemplateError
from server.engine.errors import (
    AdapterNotFoundError,
    GenerationError,
    InvalidRequestError,
    QueueFullError,
)
from server.engine.interface import (
    AdapterUpload,
    FinishReason,
    GenerationRequest,
    ModelInfo,
    SamplingParams,
    TokenLogprob,
)
from server.engine.model_source import ModelLoadError
from server.engine.rows import RowDelta


def _trip(message: dict[str, Any]) -> dict[str, Any]:
    """One message through the bytes the pipe carries."""
    [back] = wire.loads(wire.dumps([message]))
    return back


def _error_trip(error: BaseException) -> Exception:
    return wire.error_from_wire(_trip(wire.error_to_wire(error)))


# ---- framing ------------------------------------------------------------------------------------


def test_dumps_writes_one_compact_json_array() -> None:
    data = wire.dumps([{"op": "chunk", "text": "naïve 🙂"}, {"op": "stats"}])
    assert isinstance(data, bytes)
    assert data == b'[{"op":"chunk","text":"na\\u00efve \\ud83d\\ude42"},{"op":"stats"}]'
    assert wire.loads(data) == [{"op": "chunk", "text": "naïve 🙂"}, {"op": "stats"}]


@pytest.mark.parametrize("data", [b'{"op": "submit"}', b'"submit"', b"3", b"null"])
def test_loads_refuses_anything_but_an_array(data: bytes) -> None:
    with pytest.raises(ValueError, match="JSON array"):
        wire.loads(data)


def test_loads_refuses_what_is_not_json() -> None:
    """A pickle (or any non-JSON bytes) is never decoded as anything but an error."""
    import pickle

    with pytest.raises(ValueError):
        wire.loads(pickle.dumps([{"op": "submit"}]))


# ---- records ------------------------------------------------------------------------------------


@pytest.mark.parametrize("request_", [
    GenerationRequest(request_id="r1", prompt_ids=(1, 2, 3), adapter_id=None),
    GenerationRequest(request_id="r2", prompt_ids=(), adapter_id="pt3", namespace="tenant-b",
                      params=SamplingParams(max_new_tokens=7, temperature=0.7, top_p=0.9,
                                            top_k=5, seed=1234, stop=("\n", "naïve 🙂"),
                                            ignore_eos=True)),
    GenerationRequest(request_id="r3", prompt_ids=(4,), adapter_id=None,
                      params=SamplingParams(presence_penalty=0.5, frequency_penalty=-1.0,
                                            repetition_penalty=1.2, logprobs=3,
                                            prompt_logprobs=0)),
])
def test_request_round_trips_exactly(request_: GenerationRequest) -> None:
    back = wire.request_from_wire(_trip(wire.request_to_wire(request_)))
    assert back == request_
    assert isinstance(back.prompt_ids, tuple) and isinstance(back.params.stop, tuple)


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=float("inf")),
    SamplingParams(stop=("\ud800",)),
], ids=["infinite-temperature", "lone-surrogate-stop"])
def test_every_request_the_in_process_engine_serves_can_be_sent(params: SamplingParams) -> None:
    """A JSON body can carry Infinity and "\\ud800" (FastAPI's json.loads accepts both); the
    pipe must carry them intact, so the engine process answers them as the in-process Engine
    does (it refuses the first and serves the second)."""
    request_ = GenerationRequest(request_id="r", prompt_ids=(1,), adapter_id=None, params=params)
    back = wire.request_from_wire(_trip(wire.request_to_wire(request_)))
    assert back.params.stop == params.stop
    assert back.params.temperature == params.temperature


def test_a_delta_round_trips_as_token_ids_only() -> None:
    delta = RowDelta(token_ids=(5, 6))
    sent = _trip(wire.delta_to_wire(delta))
    assert "text" not in sent  # the HTTP process makes text of the ids
    back = wire.delta_from_wire(sent)
    assert back == delta and isinstance(back.token_ids, tuple)


@pytest.mark.parametrize("reason", [FinishReason.LENGTH, FinishReason.EOS])
def test_a_last_delta_round_trips_with_its_finish_reason_an_enum_again(
        reason: FinishReason) -> None:
    delta = RowDelta(token_ids=(10, 11, 12), finish_reason=reason)
    sent = _trip(wire.delta_to_wire(delta))
    assert sent["finish_reason"] == reason.value
    back = wire.delta_from_wire(sent)
    assert back == delta and type(back.finish_reason) is FinishReason


def test_logprobs_round_trip_in_deltas() -> None:
    lp = (TokenLogprob(5, -0.25, ((5, -0.25), (9, -1.5))), TokenLogprob(6, -3.0))
    delta = RowDelta(token_ids=(5, 6), logprobs=lp,
                     prompt_logprobs=(None, TokenLogprob(7, -2.0, ((1, -0.5),))))
    assert wire.delta_from_wire(_trip(wire.delta_to_wire(delta))) == delta


def _prompt_logprobs(tokens: int, top: int) -> tuple[TokenLogprob | None, ...]:
    return (None, *(TokenLogprob(i % 7, -0.125 * i, tuple((j, -1.0 / (j + 1) - i)
                                                          for j in range(top)))
                    for i in range(1, tokens)))


def test_logprobs_travel_as_flat_arrays_of_numbers() -> None:
    """A prompt's logprobs decode as a few long lists, not one list per token and entry."""
    sent = _trip(wire.delta_to_wire(RowDelta(token_ids=(1,),
                                             prompt_logprobs=_prompt_logprobs(50, 20))))
    compact = sent["prompt_logprobs"]
    assert all(isinstance(v, list) for v in compact.values())
    assert all(not isinstance(x, list) for v in compact.values() for x in v)
    assert len(compact["top_ids"]) == len(compact["top_logprobs"]) == 49 * 20


@pytest.mark.parametrize("logprobs", [
    (),
    (None,),
    (TokenLogprob(3, -0.0),),  # no top entries
    (TokenLogprob(3, float("-inf"), ((3, float("-inf")), (4, -1e-300))), None,
     TokenLogprob(0, 0.0, ((0, 0.0),)), TokenLogprob(2**40, -123.456789, ((1, -2.5),))),
    _prompt_logprobs(500, 20),
], ids=["empty", "only-none", "no-top", "edge-values", "long-prompt"])
def test_logprobs_round_trip_exactly_with_their_types(
        logprobs: tuple[TokenLogprob | None, ...]) -> None:
    delta = RowDelta(token_ids=(1, 2), logprobs=tuple(v for v in logprobs if v is not None),
                     prompt_logprobs=logprobs, finish_reason=FinishReason.LENGTH)
    back = wire.delta_from_wire(_trip(wire.delta_to_wire(delta)))
    assert back == delta
    assert repr(back) == repr(delta)  # -0.0 stays -0.0; ints stay ints, floats floats
    for value in back.prompt_logprobs or ():
        assert value is None or isinstance(value.top, tuple)


def test_frames_carry_every_message_in_order_in_bounded_writes() -> None:
    messages = [{"op": "delta", "key": str(i), "payload": "x" * (i % 7)} for i in range(60)]
    for limit in range(40, 400):
        frames = list(wire.frames(messages, limit=limit))
        assert len(frames) > 1
        assert [m for frame in frames for m in wire.loads(frame)] == messages
        assert all(len(frame) <= limit or len(wire.loads(frame)) == 1 for frame in frames)
        # Full: the next frame's first message would not have fitted in it.
        assert all(len(a) + len(wire.dumps(wire.loads(b)[:1])) - 1 > limit
                   for a, b in zip(frames, frames[1:], strict=False))


def test_a_message_larger_than_a_frame_goes_alone() -> None:
    big = {"op": "delta", "key": "1", "payload": "y" * 5000}
    frames = list(wire.frames([{"op": "beat"}, big, {"op": "beat"}], limit=1000))
    assert [wire.loads(frame) for frame in frames] == [[{"op": "beat"}], [big],
                                                       [{"op": "beat"}]]


def test_frames_are_what_dumps_writes() -> None:
    """One frame of small messages is the very bytes dumps makes of them."""
    messages = [{"op": "chunk", "text": "naïve 🙂", "t": float("inf")}, {"op": "stats"}]
    assert list(wire.frames(messages)) == [wire.dumps(messages)]


def test_model_info_round_trips() -> None:
    info = ModelInfo(name="builtin:tiny", architecture="LlamaForCausalLM", is_seq2seq=False,
                     hidden_size=64, device="cpu", dtype="float32", max_context=512)
    assert wire.info_from_wire(_trip(wire.info_to_wire(info))) == info


@pytest.mark.parametrize("upload", [
    AdapterUpload(config_path="/spool/c.json", weights_path="/spool/w",
                  weights_name="adapter_model.safetensors"),
    AdapterUpload(archive_path="/spool/a", archive_name="adapter.tar.gz"),
])
def test_upload_round_trips(upload: AdapterUpload) -> None:
    assert wire.upload_from_wire(_trip(wire.upload_to_wire(upload))) == upload


def test_record_round_trips_from_its_dict() -> None:
    record = AdapterRecord(adapter_id="pt3", namespace="t1", peft_type=PeftType.P_TUNING,
                           task_type=TaskType.CAUSAL_LM, num_virtual_tokens=3, token_dim=64,
                           sha256="ab" * 32, size_bytes=1024,
                           created_at="2026-11-23T10:00:00.123456Z")
    back = wire.record_from_wire(_trip(record.to_dict()))
    assert back == record and type(back.peft_type) is PeftType


# ---- errors -------------------------------------------------------------------------------------


def _declared_errors() -> set[type[Exception]]:
    return {value for module in (store_errors, engine_errors) for value in vars(module).values()
            if inspect.isclass(value) and issubclass(value, Exception)} | {ModelLoadError}


def test_the_table_holds_every_engine_and_store_error_under_its_own_name() -> None:
    """An error class missing here would reach the HTTP layer as a 500."""
    assert set(wire.ERRORS.values()) == _declared_errors()
    assert all(cls.__name__ == name for name, cls in wire.ERRORS.items())


@pytest.mark.parametrize("cls", sorted(_declared_errors(), key=lambda c: c.__name__),
                         ids=lambda c: c.__name__)
def test_each_registered_error_comes_back_as_its_exact_class(cls: type[Exception]) -> None:
    back = _error_trip(cls("what went wrong"))
    assert type(back) is cls
    assert str(back) == "what went wrong"


def test_queue_full_keeps_its_retry_after() -> None:
    back = _error_trip(QueueFullError("full", retry_after_s=7))
    assert type(back) is QueueFullError and back.retry_after_s == 7.0
    assert str(back) == "full"


def test_queue_full_without_a_retry_after_gets_the_default() -> None:
    back = wire.error_from_wire({"type": "QueueFullError", "message": "full"})
    assert isinstance(back, QueueFullError) and back.retry_after_s == 1.0


def test_only_errors_that_carry_a_retry_after_send_one() -> None:
    assert "retry_after_s" not in wire.error_to_wire(AdapterNotFoundError("nope"))
    assert wire.error_to_wire(QueueFullError("full", retry_after_s=2.5))["retry_after_s"] == 2.5


def test_an_unregistered_subclass_travels_as_its_nearest_registered_class() -> None:
    class TenantAdapterMissing(AdapterNotFoundError):
        pass

    back = _error_trip(TenantAdapterMissing("no pt3 here"))
    assert type(back) is AdapterNotFoundError and str(back) == "no pt3 here"
    assert type(_error_trip(ChatTemplateError("no template"))) is InvalidRequestError


@pytest.mark.parametrize(("error", "message"), [
    (RuntimeError("CUDA out of memory"), "RuntimeError: CUDA out of memory"),
    (KeyError("x"), "KeyError: 'x'"),
    (ValueError("bad"), "ValueError: bad"),  # not an InvalidRequestError, its subclass
])
def test_an_unknown_failure_travels_as_a_generation_error_naming_its_type(
        error: Exception, message: str) -> None:
    back = _error_trip(error)
    assert type(back) is GenerationError
    assert str(back) == message


def test_a_generation_error_is_not_prefixed_with_its_own_name() -> None:
    assert str(_error_trip(GenerationError("the batch failed"))) == "the batch failed"


def test_a_foreign_class_that_shares_a_registered_name_is_not_taken_for_it() -> None:
    """Matching is by class, not by name: a look-alike must not get a 404."""

    class AdapterNotFoundError(Exception):
        pass

    back = _error_trip(AdapterNotFoundError("nope"))
    assert type(back) is GenerationError and str(back) == "AdapterNotFoundError: nope"


@pytest.mark.parametrize("data", [{"type": "SystemExit", "message": "m"},
                                  {"type": "NoSuchError", "message": "m"},
                                  {"message": "m"}])
def test_a_type_name_not_in_the_table_is_rebuilt_as_a_generation_error(
        data: dict[str, Any]) -> None:
    """The engine process may only name the table's classes; anything else is a 500."""
    back = wire.error_from_wire(data)
    assert type(back) is GenerationError and str(back) == "m"


def test_error_messages_are_json_clean() -> None:
    encoded = wire.dumps([wire.error_to_wire(QueueFullError("naïve", retry_after_s=1))])
    assert json.loads(encoded) == [{"type": "QueueFullError", "message": "naïve",
                                    "retry_after_s": 1.0}]
