"""Request work that grows with its size leaves the event loop: on a worker thread past a size,
and large JSON bodies written in small pieces so that the interpreter lock changes hands
between them. The event loop must keep answering health checks and other tenants."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any, TypeVar

from fastapi.responses import JSONResponse

T = TypeVar("T")

# Work on a request's input or output that grows with its size runs on a worker thread above
# these sizes: prompts of more characters, chats of more messages, more token ids or logprob
# entries (decoding token strings, writing logprobs, rendering a large response). The event
# loop must keep answering health checks and other tenants meanwhile. Smaller work stays
# inline (a thread hop costs more than doing it).
OFF_LOOP_CHARS = 16_384
OFF_LOOP_MESSAGES = 64
OFF_LOOP_TOKENS = 2_048


async def off_loop(work: Callable[[], T], *, chars: int = 0, messages: int = 0,
                   tokens: int = 0) -> T:
    """`work()`, on a worker thread when its size (characters, messages, token ids or
    logprob entries) is past the OFF_LOOP_* bounds, else inline: the one way request work
    that grows with the input leaves the event loop."""
    if chars > OFF_LOOP_CHARS or messages > OFF_LOOP_MESSAGES or tokens > OFF_LOOP_TOKENS:
        return await asyncio.to_thread(work)
    return work()


# json.dumps holds the interpreter lock for the whole of one call, so one call on a body of
# megabytes stalls the event loop even from a worker thread. Bodies are written in calls of
# at most this many list items (the lock changes hands between them).
_JSON_PIECE = 1024
# What JSONResponse writes (compact UTF-8, no NaN), and what json.dumps writes by default.
_AS_RESPONSE: dict[str, Any] = {"ensure_ascii": False, "allow_nan": False,
                                "separators": (",", ":")}
_AS_DUMPS: dict[str, Any] = {"ensure_ascii": True, "allow_nan": True,
                             "separators": (", ", ": ")}


def json_text(value: Any, *, as_response: bool = True) -> str:
    """What JSONResponse writes for `value` (as_response=False: what json.dumps writes by
    default), made in many small json.dumps calls, so writing a large body on a worker thread
    leaves the event loop free to run between them."""
    out: list[str] = []
    _write_json(value, out, _AS_RESPONSE if as_response else _AS_DUMPS)
    return "".join(out)


class PiecewiseJSONResponse(JSONResponse):
    """A JSONResponse whose body is written by json_text: build it through off_loop."""

    def render(self, content: Any) -> bytes:
        return json_text(content).encode("utf-8")


def _write_json(value: Any, out: list[str], options: dict[str, Any]) -> None:
    item_sep, key_sep = options["separators"]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value) or not any(
                isinstance(v, dict | list | tuple) for v in value.values()):
            out.append(json.dumps(value, **options))
            return
        out.append("{")
        for i, (key, item) in enumerate(value.items()):
            out.append((item_sep if i else "") + json.dumps(key, **options) + key_sep)
            _write_json(item, out, options)
        out.append("}")
    elif isinstance(value, list | tuple):
        if any(isinstance(v, dict | list | tuple) for v in value):
            out.append("[")
            for i, item in enumerate(value):
                if i:
                    out.append(item_sep)
                _write_json(item, out, options)
            out.append("]")
        elif len(value) <= _JSON_PIECE:
            out.append(json.dumps(value, **options))
        else:
            out.append("[" + item_sep.join(
                json.dumps(value[i:i + _JSON_PIECE], **options)[1:-1]
                for i in range(0, len(value), _JSON_PIECE)) + "]")
    else:
        out.append(json.dumps(value, **options))
