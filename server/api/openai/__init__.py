"""The OpenAI-compatible routes: `/v1/completions`, `/v1/chat/completions`, `/v1/models`, and the
error shape, streaming and logprobs they share. They serve the same engine as `/v1/generate`."""
