"""run_checks.sh's record of one call: every step's command, limit, exit status, time and the
tail of its output, in one JSON file rewritten whole (atomically) after each step, so the file
is complete whenever the call stops.

    python3 benchmarks/gpu/record.py PATH start --call 1 --device cuda --quick 0 --budget 270
    python3 benchmarks/gpu/record.py PATH step NAME --limit 60 --rc 0 --seconds 12 \
        --output FILE --command "COMMAND"
    python3 benchmarks/gpu/record.py PATH skip NAME REASON
    python3 benchmarks/gpu/record.py PATH done

Only the standard library: it runs before the carried wheels are installed.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

TAIL_LINES = 60
# What a step's exit status means, beside the number.
STATUS = {0: "ok", 124: "stopped at its limit", 137: "killed after its limit"}


def _load(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _write(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    os.replace(tmp, path)


def _tail(path: Path | None) -> list[str]:
    if path is None or not path.exists():
        return []
    lines = path.read_text(errors="replace").splitlines()
    return [line[-300:] for line in lines[-TAIL_LINES:]]


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("path", type=Path)
    sub = p.add_subparsers(dest="what", required=True)
    start = sub.add_parser("start")
    start.add_argument("--call", required=True)
    start.add_argument("--device", required=True)
    start.add_argument("--quick", type=int, default=0)
    start.add_argument("--budget", type=int, required=True)
    step = sub.add_parser("step")
    step.add_argument("name")
    step.add_argument("--limit", type=int, required=True)
    step.add_argument("--rc", type=int, required=True)
    step.add_argument("--seconds", type=int, required=True)
    step.add_argument("--output", type=Path, default=None)
    step.add_argument("--command", default="")
    skip = sub.add_parser("skip")
    skip.add_argument("name")
    skip.add_argument("reason")
    sub.add_parser("done")
    args = p.parse_args(argv)

    now = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime())
    if args.what == "start":
        args.path.parent.mkdir(parents=True, exist_ok=True)
        _write(args.path, {"call": args.call, "device": args.device, "quick": bool(args.quick),
                           "budget_s": args.budget, "started": now, "finished": None,
                           "steps": []})
        return 0
    data = _load(args.path)
    if args.what == "step":
        data["steps"].append({"name": args.name, "command": args.command,
                              "limit_s": args.limit, "rc": args.rc,
                              "status": STATUS.get(args.rc, "failed"),
                              "seconds": args.seconds, "output_tail": _tail(args.output)})
    elif args.what == "skip":
        data["steps"].append({"name": args.name, "status": "skipped", "reason": args.reason})
    else:
        data["finished"] = now
    _write(args.path, data)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
