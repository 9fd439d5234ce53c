"""The engine: one frozen base model serving many tenants' soft prompts.

Data flow: an HTTP request's schema -> `GenerationRequest` (interface.py) -> the core's record
(a ticket, then a row of a batch) -> per-step row deltas -> `TokenChunk`s and one
`GenerationResult` (output_processor.py). Import what you use from its module: this package
imports nothing, so the HTTP layer can answer errors and health checks without loading torch.
"""
