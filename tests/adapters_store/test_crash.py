"""Kill -9 a writer at steps of its writes chosen at random: what remains is always whole, and
nothing acked is lost. The writer says when it has reached its step; the kill follows."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

from adapters_store import LocalAdapterStore

KILLS = 30
WRITER = Path(__file__).with_name("crash_writer.py")


def _check(root: Path, acked: set[tuple[str, str]]) -> int:
    store = LocalAdapterStore(root)  # a restart: also removes the dead writer's leftovers
    records = store.list()
    for record in records:
        loaded = store.get(record.namespace, record.adapter_id, verify=True)
        folder = root / record.namespace / record.adapter_id
        data = (folder / "embeddings.safetensors").read_bytes()
        assert hashlib.sha256(data).hexdigest() == record.sha256 == loaded.record.sha256
        assert json.loads((folder / "adapter_config.json").read_bytes())["num_virtual_tokens"] \
            == record.num_virtual_tokens == loaded.embeddings.shape[0]
    present = {(r.namespace, r.adapter_id) for r in records}
    assert acked <= present, f"acknowledged adapters lost: {sorted(acked - present)}"
    assert os.listdir(root / ".tmp") == []
    assert len(os.listdir(root / ".objects")) == len(records)
    return len(records)


def test_killed_writer_never_leaves_a_partial_adapter(tmp_path):
    root = tmp_path / "store"
    acks_file = Path(str(root) + ".acks")
    repo = Path(__file__).resolve().parents[2]
    zygote = subprocess.Popen([sys.executable, str(WRITER), str(root)], cwd=repo,
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    acked: set[tuple[str, str]] = set()
    interrupted = 0  # kills that left a half-done put behind (proof they hit mid-write)
    try:
        for seed in range(KILLS):
            zygote.stdin.write(f"go {seed}\n")
            zygote.stdin.flush()
            pid, state = zygote.stdout.readline().split()
            assert state == "stopped", f"writer {seed} exited before its step"
            os.kill(int(pid), signal.SIGKILL)
            zygote.stdin.write(f"reap {pid}\n")
            zygote.stdin.flush()
            assert zygote.stdout.readline().strip() == "done"
            if acks_file.exists():
                for line in acks_file.read_text().splitlines():
                    parts = line.split()
                    if len(parts) == 3 and len(parts[2]) == 64:
                        acked.add((parts[0], parts[1]))
            leftovers = os.listdir(root / ".tmp") + os.listdir(root / ".objects")
            interrupted += len(leftovers) > sum(1 for _ in (root).glob("t*/*")) + sum(
                1 for _ in root.glob("fresh/*"))
            count = _check(root, acked)
    finally:
        zygote.stdin.close()
        zygote.wait(timeout=10)
    assert count > 5 and len(acked) > 5  # the writers really wrote
    assert interrupted >= 3, interrupted
