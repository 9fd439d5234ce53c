"""The part of the engine client that is the same wherever the core runs.

The HTTP layer talks to one surface (server.engine.interface.EngineClient) whether the core
runs in this process (server.engine.engine.Engine) or in the engine process behind a pipe
(server.engine.remote.RemoteEngine). Both make text in this process from the token-id deltas
their core hands out, with the same tokenizer calls and the same output processor; that is
written here once. A subclass supplies the tokenizer once it is loaded, the model's name for
chat templates, and `open_deltas`: how a request reaches its core.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from server.engine.chat import render_chat
from server.engine.detokenizer import decode_kwargs, token_bytes
from server.engine.errors import EngineNotReadyError
from server.engine.interface import GenerationRequest, GenerationResult
from server.engine.output_processor import OutputStream, RequestOutput

if TYPE_CHECKING:
    from server.engine.core_client import Submission


class Frontend:
    """Tokenizer calls, generate and open_stream over a subclass's `open_deltas`, and the
    loading state both clients report the same way."""

    def __init__(self) -> None:
        self._weight_of: Callable[[str], float] = lambda _tenant: 1.0
        self._load_error: BaseException | None = None
        self._loaded_event = threading.Event()  # loaded, or failed to

    # ---- what a subclass supplies ---------------------------------------------------------------

    def _loaded_tokenizer(self) -> Any:
        """The tokenizer; EngineNotReadyError while the model loads or after it failed."""
        raise NotImplementedError

    def _chat_model_name(self) -> str:
        """The model's name as chat templates see it."""
        raise NotImplementedError

    async def open_deltas(self, request: GenerationRequest, *, stream: bool) -> Submission:
        """Submit the request to the core and return its deltas of token ids once the core
        accepted it (404/422/429/503 raise here, before a response starts); `stream`: it
        wants every step's."""
        raise NotImplementedError

    def shutdown(self, timeout: float = 30.0) -> None:
        raise NotImplementedError

    # ---- loading --------------------------------------------------------------------------------

    def set_tenant_weights(self, weight_of: Callable[[str], float]) -> None:
        """Where fair scheduling reads each tenant's weight, from any thread; the app points
        it at the current --api-keys table."""
        self._weight_of = weight_of

    def wait_until_ready(self, timeout: float | None = None) -> None:
        """Block until the model is loaded; re-raise the load error (for the CLI and tests)."""
        if not self._loaded_event.wait(timeout):
            raise EngineNotReadyError(f"the model did not load within {timeout} s")
        if self._load_error is not None:
            raise self._load_error

    @property
    def load_error(self) -> BaseException | None:
        return self._load_error

    async def aclose(self, timeout: float = 30.0) -> None:
        await asyncio.to_thread(self.shutdown, timeout)

    # ---- text -----------------------------------------------------------------------------------

    def tokenize(self, text: str, *, add_special_tokens: bool = True) -> list[int]:
        """By default special tokens are added as the tokenizer does."""
        return list(self._loaded_tokenizer()(
            text, add_special_tokens=add_special_tokens)["input_ids"])

    def detokenize(self, token_ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self._loaded_tokenizer().decode(
            token_ids, **decode_kwargs(skip_special_tokens=skip_special_tokens))

    def token_bytes(self, token_id: int) -> bytes:
        return token_bytes(self._loaded_tokenizer(), token_id)

    def apply_chat_template(self, messages: list[dict[str, str]], *,
                            add_generation_prompt: bool = True,
                            add_special_tokens: bool = False) -> list[int]:
        """Prompt ids of chat messages via the tokenizer's template (server.engine.chat)."""
        return render_chat(self._loaded_tokenizer(), messages, model_name=self._chat_model_name(),
                           add_generation_prompt=add_generation_prompt,
                           add_special_tokens=add_special_tokens)

    # ---- generation -----------------------------------------------------------------------------

    async def generate(self, request: GenerationRequest) -> GenerationResult:
        stream = await self._open(request, stream=False)
        return await stream.result()  # cancelled: the stream aborts the row

    async def open_stream(self, request: GenerationRequest) -> OutputStream:
        """Submits (404/422/429/503 raise here, before a response starts) and returns the
        stream: TokenChunks, then one GenerationResult; aclose() (or dropping it) aborts."""
        return await self._open(request, stream=True)

    async def _open(self, request: GenerationRequest, *, stream: bool) -> OutputStream:
        deltas = await self.open_deltas(request, stream=stream)
        output = RequestOutput(request, self._loaded_tokenizer(), stream=stream,
                               prompt_tokens=deltas.prompt_tokens,
                               virtual_tokens=deltas.virtual_tokens)
        return OutputStream(deltas, output)
