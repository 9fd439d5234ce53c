"""The frontend's half of a request: its deltas of token ids become text, chunks and a result.

The engine's step loop hands out token ids only (server.engine.rows). Here, on the
event loop of the client that waits for the request (the HTTP process, also under
--engine-process), each request's ids are detokenized, its stop strings looked for and its
stream chunks and final GenerationResult built. When a stop string completes, the request is
answered at once and its row aborted: the tokens the engine drew past the stop are dropped,
from the text, the ids, the logprobs and the usage alike.

Keeping this off the step loop is what lets the host's work for one step run while the device
computes the next: the engine thread launches step N+1 as soon as step N's ids are on the
host, and the decoding of step N happens on another thread (or process) meanwhile.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from typing import Any, Protocol

from server.engine.detokenizer import IncrementalDetokenizer, StopStringFilter, decode_kwargs
from server.engine.interface import (
    FinishReason,
    GenerationRequest,
    GenerationResult,
    TokenChunk,
    TokenLogprob,
)
from server.engine.rows import RowDelta, is_live


class RequestOutput:
    """One request's output as its deltas arrive: text, stop strings, chunks, result."""

    def __init__(self, request: GenerationRequest, tokenizer: Any, *, stream: bool,
                 prompt_tokens: int, virtual_tokens: int) -> None:
        self._request = request
        self.request_id = request.request_id
        self._tokenizer = tokenizer
        self._stream = stream
        self._prompt_tokens = prompt_tokens
        self._virtual_tokens = virtual_tokens
        # Text is tracked token by token only where it is needed before the end: where the
        # engine hands tokens out every step.
        params = request.params
        tracks = is_live(stream, params)
        self._decode = decode_kwargs(skip_special_tokens=params.skip_special_tokens)
        self._detok = IncrementalDetokenizer(
            tokenizer, skip_special_tokens=params.skip_special_tokens) if tracks else None
        self._filter = StopStringFilter(
            params.stop, include=params.include_stop_str_in_output) if tracks else None
        # The eos or stop token that ends the output: its text is kept only when asked.
        self._keep_end = params.include_stop_str_in_output
        self._min_tokens = params.min_tokens
        self.token_ids: list[int] = []
        self.logprobs: list[TokenLogprob] | None = (
            None if request.params.logprobs is None else [])
        self.prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
        self.cached_tokens = 0
        self.finished = False  # the result is out; later deltas are ignored
        self._sent = 0  # token ids already in a chunk
        self._sent_prompt = False

    def add(self, delta: RowDelta) -> list[TokenChunk | GenerationResult]:
        """What the delta releases: stream chunks, then the result when the request is over
        (a stop string, or the engine's finish reason)."""
        if self.finished:
            return []
        if delta.prompt_logprobs is not None:
            self.prompt_logprobs = delta.prompt_logprobs
        if delta.cached_tokens is not None:
            self.cached_tokens = delta.cached_tokens
        ids = delta.token_ids
        if self.logprobs is not None and (delta.logprobs is None
                                          or len(delta.logprobs) != len(ids)):
            raise RuntimeError("a request that asked for logprobs got tokens without them")
        released = ""
        for i, token in enumerate(ids):
            self.token_ids.append(token)
            if self.logprobs is not None:
                assert delta.logprobs is not None
                self.logprobs.append(delta.logprobs[i])
            if self._filter is None or self._detok is None:
                continue
            if (delta.finish_reason is FinishReason.EOS and i == len(ids) - 1
                    and not self._keep_end):
                break  # the eos token's text is not the request's
            more, stopped = self._filter.feed(self._detok.push(token),
                                              may_stop=self._may_stop())
            released += more
            if stopped:
                return self._finish(FinishReason.STOP, released)
        if delta.finish_reason is not None:
            return self._finish(delta.finish_reason, released)
        # A stream's first event leaves with its first token, even while that token's text is
        # held back (a partial character, a possible stop string).
        if released or (self._sent == 0 and self.token_ids):
            return self._chunk(released)
        return []

    def _finish(self, reason: FinishReason, released: str) -> list[TokenChunk | GenerationResult]:
        if reason is not FinishReason.STOP and self._filter is not None:
            assert self._detok is not None
            # A partial character or a held stop-string prefix is final text now.
            more, stopped = self._filter.feed(self._detok.flush(), may_stop=self._may_stop())
            released += more
            if stopped:
                reason = FinishReason.STOP
            else:
                released += self._filter.flush()
        if self._filter is not None:
            text = self._filter.text
        else:
            drop_end = reason is FinishReason.EOS and not self._keep_end
            ids = self.token_ids[:-1] if drop_end else self.token_ids
            text = self._tokenizer.decode(ids, **self._decode)
        self.finished = True
        out: list[TokenChunk | GenerationResult] = []
        if released or self._sent < len(self.token_ids):
            out += self._chunk(released)
        request = self._request
        out.append(GenerationResult(
            request_id=request.request_id, adapter_id=request.adapter_id, text=text,
            token_ids=tuple(self.token_ids), finish_reason=reason,
            prompt_tokens=self._prompt_tokens, virtual_tokens=self._virtual_tokens,
            completion_tokens=len(self.token_ids), cached_tokens=self.cached_tokens,
            logprobs=None if self.logprobs is None else tuple(self.logprobs),
            prompt_logprobs=self.prompt_logprobs))
        return out

    def _may_stop(self) -> bool:
        """Stop strings end the output only once more than min_tokens tokens exist (as
        vLLM: a match completed by one of the first min_tokens tokens does not count)."""
        return len(self.token_ids) > self._min_tokens

    def _chunk(self, text: str) -> list[TokenChunk]:
        start, self._sent = self._sent, len(self.token_ids)
        if not self._stream:
            return []
        prompt = None
        if self.prompt_logprobs is not None and not self._sent_prompt:
            prompt, self._sent_prompt = self.prompt_logprobs, True
        return [TokenChunk(token_ids=tuple(self.token_ids[start:]), text=text,
                           logprobs=None if self.logprobs is None
                           else tuple(self.logprobs[start:]),
                           prompt_logprobs=prompt, prompt_tokens=self._prompt_tokens)]


class DeltaSource(Protocol):
    """A request's deltas as the engine hands them out (in process, or over the engine
    process's pipe): raises the request's error, or CancelledError when it was aborted."""

    def __aiter__(self) -> AsyncIterator[RowDelta]: ...

    async def __anext__(self) -> RowDelta: ...

    def close(self) -> None:
        """Abort the request's row if it is still running (a no-op once it finished)."""
        ...


class OutputStream:
    """What open_stream returns: TokenChunks, then exactly one GenerationResult.

    Closing it (or dropping it) aborts the request, even if it was never iterated; a stop
    string closes it too, so the engine stops computing a row whose answer is out."""

    def __init__(self, source: DeltaSource, output: RequestOutput) -> None:
        self._source = source
        self._output = output
        self._ready: list[TokenChunk | GenerationResult] = []
        self._closed = False
        self.request_id = output.request_id

    def __aiter__(self) -> OutputStream:
        return self

    async def __anext__(self) -> TokenChunk | GenerationResult:
        while not self._ready:
            if self._output.finished or self._closed:
                raise StopAsyncIteration
            try:
                delta = await self._source.__anext__()
                self._ready = self._output.add(delta)
            except BaseException:
                self._close()
                raise
            if self._output.finished:
                self._close()  # a stop string: the row is still running
        return self._ready.pop(0)

    async def result(self) -> GenerationResult:
        """Run to the end; the result (generate's answer)."""
        try:
            async for item in self:
                if isinstance(item, GenerationResult):
                    return item
        finally:
            self._close()
        raise RuntimeError("the request's output ended without a result")

    async def aclose(self) -> None:
        self._close()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._source.close()

    def __del__(self) -> None:  # dropped without aclose (e.g. `break` out of async for)
        with contextlib.suppress(Exception):
            self._close()

