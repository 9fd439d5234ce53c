"""Writer for the crash test: a zygote that forks store writers on request.

Importing torch takes most of a second, so it happens once here; each forked child runs a
put/overwrite loop until the test SIGKILLs it. Protocol on stdin/stdout, one line each:
``go <seed>`` -> prints the child's pid; ``reap <pid>`` -> waits for it, prints ``done``.
Each child appends ``<namespace> <adapter_id> <sha256>`` to <root>.acks after each put returns.
"""

from __future__ import annotations

import json
import os
import random
import sys

import torch

from adapters_store import LocalAdapterStore, ParsedAdapter, PeftType, TaskType


def _parsed(rng: random.Random) -> ParsedAdapter:
    rows = rng.choice((1, 8, 64, 512))
    generator = torch.Generator().manual_seed(rng.randrange(2**31))
    config = {"peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "num_virtual_tokens": rows}
    return ParsedAdapter(
        peft_type=PeftType.PROMPT_TUNING, task_type=TaskType.CAUSAL_LM,
        num_virtual_tokens=rows, num_transformer_submodules=1, token_dim=64, config=config,
        config_bytes=json.dumps(config).encode(),
        embeddings=torch.randn(rows, 64, generator=generator),
    )


def write_forever(root: str, seed: int) -> None:
    rng = random.Random(seed)
    store = LocalAdapterStore(root)
    acks = os.open(root + ".acks", os.O_WRONLY | os.O_APPEND | os.O_CREAT)
    n = 0
    while True:
        n += 1
        if rng.random() < 0.2:
            ns, aid, overwrite = "fresh", f"s{seed}-{n}", False
        else:
            ns, aid, overwrite = rng.choice(("t1", "t2")), f"a{rng.randrange(4)}", True
        record = store.put(ns, aid, _parsed(rng), overwrite=overwrite)
        os.write(acks, f"{ns} {aid} {record.sha256}\n".encode())


def main() -> None:
    root = sys.argv[1]
    torch.set_num_threads(1)
    for line in sys.stdin:
        cmd, arg = line.split()
        if cmd == "go":
            pid = os.fork()
            if pid == 0:
                try:
                    write_forever(root, int(arg))
                finally:
                    os._exit(1)
            print(pid, flush=True)
        elif cmd == "reap":
            os.waitpid(int(arg), 0)
            print("done", flush=True)


if __name__ == "__main__":
    main()
