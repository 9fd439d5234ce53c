"""The tools vLLM users point at OpenAI-compatible servers (guidellm, aiperf, litellm), run
unchanged against the real server: `python -m benchmarks tools`."""
