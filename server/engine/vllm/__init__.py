"""vLLM as this server's engine: its V1 engine core behind the same frontend.

The frontend (validation, adapters, templates, output processing) is the built-in engine's
(server.engine.engine); this package is the core behind it (server.engine.core_client). A
request becomes one vLLM prompt in the mixed form: its text's and anchors' token ids, with the
adapter's soft rows as embeddings at the positions the template gives them (server.engine.
vllm.prompts). vLLM schedules, batches and prefix-caches it like any other prompt; admission in
front of it keeps the per-tenant fair shares and the queue bound (server.engine.vllm.admission);
its token ids come back as the same deltas the built-in engine hands out.

Data flow: GenerationRequest -> (admission, soft rows) -> vLLM prompt + SamplingParams ->
vLLM RequestOutput deltas -> RowDelta -> the frontend's output processor.
"""
