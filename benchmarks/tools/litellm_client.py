"""litellm's SDK against an OpenAI-compatible server, as a vLLM user calls it (provider
`hosted_vllm`, `api_base` the server's /v1): chat and text completions, plain and streaming
(`stream_options.include_usage`), all sent at once. Writes one record per request as JSON.

Runs in litellm's own environment (standard library and litellm only), started by
benchmarks/tools/runners.py:

    <litellm venv>/bin/python benchmarks/tools/litellm_client.py --base-url URL/v1 \
        --model ADAPTER --requests 16 --max-tokens 8 --out records.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from importlib.metadata import version
from pathlib import Path

# litellm fetches its model price list from the network at import unless told otherwise.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

import litellm  # noqa: E402

KINDS = ("chat", "chat-stream", "text", "text-stream")


async def one(kind: str, i: int, *, base: str, model: str, max_tokens: int) -> dict:
    args = {"model": f"hosted_vllm/{model}", "api_base": base, "api_key": "unused",
            "max_tokens": max_tokens, "temperature": 0, "timeout": 120}
    stream = kind.endswith("-stream")
    if stream:
        args |= {"stream": True, "stream_options": {"include_usage": True}}
    record: dict = {"kind": kind, "ok": False}
    try:
        if kind.startswith("chat"):
            reply = await litellm.acompletion(
                messages=[{"role": "user", "content": f"Request {i}: say something."}], **args)
        else:
            reply = await litellm.atext_completion(prompt=f"Request {i}: once upon a time",
                                                   **args)
        text, usage = await (_drain(reply, kind) if stream else _whole(reply, kind))
        record.update(text=text, completion_tokens=usage.completion_tokens if usage else None,
                      prompt_tokens=usage.prompt_tokens if usage else None)
        record["ok"] = usage is not None and usage.completion_tokens > 0
        if not record["ok"]:
            record["error"] = "no usage or no completion tokens in the reply"
    except Exception as e:  # one failed request is a record, not the end of the run
        record["error"] = f"{type(e).__name__}: {e}"[:500]
    return record


async def _whole(reply, kind: str):
    choice = reply.choices[0]
    text = choice.message.content if kind == "chat" else choice.text
    return text, reply.usage


async def _drain(reply, kind: str):
    parts: list[str] = []
    usage = None
    async for chunk in reply:
        for choice in chunk.choices or []:
            piece = choice.delta.content if kind == "chat-stream" else choice.text
            parts.append(piece or "")
        usage = getattr(chunk, "usage", None) or usage
    return "".join(parts), usage


async def run(args: argparse.Namespace) -> list[dict]:
    jobs = [one(KINDS[i % len(KINDS)], i, base=args.base_url, model=args.model,
                max_tokens=args.max_tokens) for i in range(args.requests)]
    return list(await asyncio.gather(*jobs))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--base-url", required=True, help="the server's /v1 URL")
    p.add_argument("--model", required=True)
    p.add_argument("--requests", type=int, default=16)
    p.add_argument("--max-tokens", type=int, default=8)
    p.add_argument("--out", type=Path, required=True)
    args = p.parse_args()
    records = asyncio.run(run(args))
    args.out.write_text(json.dumps({"version": version("litellm"), "records": records},
                                   indent=1))
    failed = [r for r in records if not r["ok"]]
    for r in failed[:5]:
        print(f"{r['kind']}: {r.get('error')}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
