"""Writer for the crash test: a zygote that forks store writers on request.

Importing torch takes most of a second, so it happens once here; each forked child runs a
put/overwrite loop until the test SIGKILLs it. The child stops at a step of its writes chosen
by its seed (the n-th file-system step: an fsync, symlink, rename or replace of the store, or
the write of an ack), says so, and waits there for the kill: where the kill lands depends on
the seed, never on how fast the machine runs. Protocol on stdin/stdout, one line each:
``go <seed>`` -> prints ``<pid> stopped`` once the child waits at its step (``<pid> exited``
if it died first); ``reap <pid>`` -> waits for it, prints ``done``.
Each child appends ``<namespace> <adapter_id> <sha256>`` to <root>.acks after each put returns.
"""

from __future__ import annotations

import json
import os
import random
import sys
import threading

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


# The store's steps whose order makes a put crash-safe, and the ack written after it returns.
STEPS = ("fsync", "symlink", "rename", "replace", "write")


def stop_at_step(n: int, stopped: int) -> None:
    """Make the n-th call of STEPS (from any thread) write a byte to the fd `stopped`, then
    block, with every later call, until the process is killed: the step has not run."""
    calls = 0
    lock = threading.Lock()
    real_write = os.write

    def hooked(real):
        def step(*args, **kwargs):
            nonlocal calls
            with lock:
                calls += 1
                reached = calls == n
            if reached:
                real_write(stopped, b"x")
            if calls >= n:
                threading.Event().wait()  # until SIGKILL
            return real(*args, **kwargs)
        return step

    for name in STEPS:
        setattr(os, name, hooked(getattr(os, name)))


def write_forever(root: str, seed: int, stopped: int) -> None:
    rng = random.Random(seed)
    stop_at_step(rng.randrange(1, 60), stopped)
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
            stopped_r, stopped_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                try:
                    os.close(stopped_r)
                    write_forever(root, int(arg), stopped_w)
                finally:
                    os._exit(1)
            os.close(stopped_w)
            reached = os.read(stopped_r, 1)  # b"" once the child has exited without stopping
            os.close(stopped_r)
            print(pid, "stopped" if reached else "exited", flush=True)
        elif cmd == "reap":
            os.waitpid(int(arg), 0)
            print("done", flush=True)


if __name__ == "__main__":
    main()
