"""Does lm-eval score an adapter the same through the server as with its own `hf` + `peft` model?

For each adapter (by default a prompt-tuning and a P-tuning adapter made for the served model),
runs the same tasks twice with lm-eval: through the server with `local-completions` (the command
run.py builds, `add_bos_token` decided from the tokenizer) and with lm-eval's `hf` model,
`peft=ADAPTER_DIR`, in float32. Then compares lm-eval's logged samples, request by request:
the largest difference of a log-likelihood and how many generations are identical; prints both
sides' scores beside them.

Standard library only, like run.py. lm-eval's environment needs the `hf` extra and PEFT (see
README.md next to this file); the P-tuning adapter is made there, with PEFT.

    python benchmarks/lm_eval/agreement.py --lm-eval /path/to/lmeval-venv/bin/lm_eval

Everything after `--` goes to both lm-eval runs (e.g. `-- --num_fewshot 2`). Exit status: 0 when
every log-likelihood is within --tolerance and every generation is identical, 1 when not, 2 when
a run failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__:
    from . import run as lm_run
else:  # run as a script: run.py lies beside this file, on sys.path[0]
    import run as lm_run

_P_TUNING = """
import sys, torch
from peft import PromptEncoderConfig, get_peft_model
from transformers import AutoModelForCausalLM
model_dir, out_dir, n, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
torch.manual_seed(seed)
config = PromptEncoderConfig(task_type="CAUSAL_LM", num_virtual_tokens=n,
                             encoder_reparameterization_type="MLP", encoder_hidden_size=64)
get_peft_model(base, config).save_pretrained(out_dir)
"""


def make_p_tuning_adapter(python: list[str], model_dir: str, out_dir: Path, *,
                          num_virtual_tokens: int = 8, seed: int = 1) -> Path:
    """A P-tuning (MLP encoder) adapter with seeded random weights, saved by PEFT itself."""
    proc = subprocess.run([*python, "-c", _P_TUNING, model_dir, str(out_dir),
                           str(num_virtual_tokens), str(seed)], env=lm_run.offline_env(),
                          capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"making a P-tuning adapter with {shlex.join(python)} (needs peft "
                           f"in lm-eval's environment):\n{proc.stderr[-2000:]}")
    return out_dir


def hf_command(args: argparse.Namespace, *, model_dir: str, adapter_dir: Path,
               out: Path, extra: list[str]) -> list[str]:
    model_args = f"pretrained={model_dir},peft={adapter_dir},dtype=float32"
    if args.hf_model_args:
        model_args += "," + args.hf_model_args
    return [*shlex.split(args.lm_eval), "run", "--model", "hf", "--model_args", model_args,
            "--tasks", args.tasks, "--include_path", str(lm_run.TASKS_DIR),
            "--device", args.hf_device, "--batch_size", "1", *_common(args, out), *extra]


def _common(args: argparse.Namespace, out: Path) -> list[str]:
    limit = ["--limit", str(args.limit)] if args.limit else []
    return ["--log_samples", "--output_path", str(out), *limit]


def run_lm_eval(cmd: list[str], log: Path) -> None:
    print("running: " + shlex.join(cmd), flush=True)
    with open(log, "wb") as f:
        # The task files name their data relative to the repository root.
        rc = subprocess.run(cmd, cwd=lm_run.REPO, env=lm_run.offline_env(), stdout=f,
                            stderr=subprocess.STDOUT, check=False).returncode
    if rc != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"lm-eval exited with status {rc} (log: {log}):\n{tail}")


def read_run(out: Path) -> tuple[dict[str, dict[str, float]], dict[str, dict[int, list]]]:
    """lm-eval's output directory -> (scores per task, the `resps` of each doc per task)."""
    results = sorted(out.rglob("results_*.json"))
    if not results:
        raise RuntimeError(f"no results_*.json under {out}")
    scores = {task: {k: v for k, v in metrics.items()
                     if "," in k and "_stderr" not in k and isinstance(v, int | float)}
              for task, metrics in json.loads(results[-1].read_text())["results"].items()}
    samples: dict[str, dict[int, list]] = {}
    for task in scores:
        files = sorted(out.rglob(f"samples_{task}_*.jsonl"))
        if not files:
            raise RuntimeError(f"no samples_{task}_*.jsonl under {out} (needs --log_samples)")
        samples[task] = {row["doc_id"]: row["resps"]
                         for row in map(json.loads, files[-1].read_text().splitlines())}
    return scores, samples


def compare(server: dict[str, dict[int, list]], hf: dict[str, dict[int, list]]) -> dict:
    """Request by request: log-likelihood answers ([logprob, is_greedy]) by their largest
    absolute difference, generation answers (text) by how many are identical."""
    if server.keys() != hf.keys():
        raise RuntimeError(f"the runs scored different tasks: {sorted(server)} / {sorted(hf)}")
    lls = gens = same = 0
    worst = 0.0
    for task in server:
        if server[task].keys() != hf[task].keys():
            raise RuntimeError(f"{task}: the runs scored different documents")
        for doc_id, resps in server[task].items():
            other = hf[task][doc_id]
            if len(resps) != len(other):
                raise RuntimeError(f"{task} doc {doc_id}: {len(resps)} / {len(other)} requests")
            for a, b in zip(resps, other, strict=True):
                a, b = a[0], b[0]  # one answer per request (repeats: 1)
                if isinstance(a, str):
                    gens += 1
                    same += a == b
                else:
                    lls += 1
                    diff = abs(float(a[0]) - float(b[0]))
                    worst = max(worst, diff if not math.isnan(diff) else math.inf)
    return {"loglikelihoods": lls, "max_loglikelihood_diff": worst, "generations": gens,
            "identical_generations": same}


def print_report(report: dict) -> None:
    for a in report["adapters"]:
        print(f"\n{a['name']} ({a['peft_type']}, {a['num_virtual_tokens']} virtual tokens), "
              f"server model_args: {a['server_model_args'] or '(none added)'}")
        print(f"  {'task':<24}{'metric':<20}{'server':>10}{'hf+peft':>10}")
        for task, metrics in a["scores"]["server"].items():
            for metric, value in metrics.items():
                other = a["scores"]["hf"].get(task, {}).get(metric, math.nan)
                print(f"  {task:<24}{metric:<20}{value:>10.4f}{other:>10.4f}")
        c = a["comparison"]
        print(f"  log-likelihoods: {c['loglikelihoods']}, largest difference "
              f"{c['max_loglikelihood_diff']:.2e} (tolerance {report['tolerance']:.0e})")
        print(f"  generations: {c['identical_generations']}/{c['generations']} identical")
        print(f"  agree: {'yes' if a['agree'] else 'NO'}")
    print(f"\nlm-eval through the server vs lm-eval hf+peft: "
          f"{'agree' if report['agree'] else 'DISAGREE'}")


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    argv, extra = lm_run.split_extra(argv)
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--lm-eval", default=os.environ.get("LM_EVAL", "lm_eval"),
                   help="lm-eval's command (also $LM_EVAL), as for run.py; its environment "
                        "needs lm-eval's hf extra and peft")
    p.add_argument("--tasks", default=lm_run.DEFAULT_TASKS, help="lm-eval tasks")
    p.add_argument("--limit", type=int, default=None, help="documents per task (default all)")
    p.add_argument("--tolerance", type=float, default=1e-4,
                   help="largest allowed log-likelihood difference")
    p.add_argument("--server-cmd", default=os.environ.get("SERVER_CMD",
                                                          lm_run._default_server_cmd()),
                   help="softprompt-server's command (also $SERVER_CMD)")
    p.add_argument("--model", default="builtin:tiny", help="--model of the started server; "
                   "a local directory or Hugging Face id otherwise (the hf side loads it too)")
    p.add_argument("--server-arg", action="append", default=[], metavar="ARG",
                   help="one more argument for `softprompt-server serve` (repeatable)")
    p.add_argument("--ready-timeout", type=float, default=600)
    p.add_argument("--adapter-dir", type=Path, action="append", default=[],
                   help="a PEFT adapter directory to compare (repeatable); default: a "
                        "prompt-tuning sample adapter and a P-tuning adapter made with PEFT")
    p.add_argument("--hf-device", default="cpu", help="lm-eval's --device for the hf side")
    p.add_argument("--hf-model-args", default="", help="more model_args for the hf side")
    p.add_argument("--model-args", default="", help="more model_args for the server side")
    p.add_argument("--json", type=Path, default=None, help="also write the report here")
    p.add_argument("--workdir", type=Path, default=None, help="keep the store, adapters, "
                   "lm-eval outputs and logs here (default: a temporary directory, removed)")
    args = p.parse_args(argv)
    args.num_concurrent, args.max_retries = 1, 1  # what lm_run.lm_eval_command reads
    return args, extra


def adapters_to_compare(args: argparse.Namespace, *, server_cmd: list[str], model_dir: str,
                        model_cache: Path, workdir: Path) -> list[tuple[str, Path]]:
    if args.adapter_dir:
        return [(f"adapter-{i}", d) for i, d in enumerate(args.adapter_dir, 1)]
    python = lm_run.lm_eval_python(args.lm_eval)
    if python is None:
        raise RuntimeError(f"cannot tell which Python runs {args.lm_eval!r} (it makes the "
                           "P-tuning adapter); give adapters with --adapter-dir")
    return [("prompt-tuning", lm_run.make_sample_adapter(server_cmd, args.model, model_cache,
                                                         workdir / "prompt-tuning")),
            ("p-tuning", make_p_tuning_adapter(python, model_dir, workdir / "p-tuning"))]


def agreement(args: argparse.Namespace, extra: list[str], workdir: Path) -> dict:
    server_cmd = shlex.split(args.server_cmd)
    model_cache = workdir / "model-cache"
    port = lm_run._free_port()
    url = f"http://127.0.0.1:{port}"
    server = lm_run.Server([*server_cmd, "serve", "--model", args.model, "--port", str(port),
                            "--store", str(workdir / "store"), "--model-cache",
                            str(model_cache), *args.server_arg], workdir / "server.log")
    print(f"starting the server on {url} (log: {server.log_path})", flush=True)
    server.start()
    try:
        server.wait_ready(url, args.ready_timeout)
        model_dir = (str(lm_run.builtin_dir(args.model, model_cache))
                     if args.model.startswith(lm_run.BUILTIN_PREFIX) else args.model)
        bos = lm_run.bos_model_args(args.lm_eval, model_dir, args.model_args)
        adapters = adapters_to_compare(args, server_cmd=server_cmd, model_dir=model_dir,
                                       model_cache=model_cache, workdir=workdir)
        report: dict = {"model": args.model, "tasks": args.tasks, "limit": args.limit,
                        "tolerance": args.tolerance, "adapters": []}
        for name, adapter_dir in adapters:
            record = lm_run.upload_adapter(url, name, adapter_dir, None)
            out = workdir / "out" / name
            out.mkdir(parents=True, exist_ok=True)
            run_lm_eval(lm_run.lm_eval_command(
                args, url=url, model=name, tokenizer=model_dir, bos_args=bos,
                extra=[*_common(args, out / "server"), *extra]), out / "server.log")
            run_lm_eval(hf_command(args, model_dir=model_dir, adapter_dir=adapter_dir,
                                   out=out / "hf", extra=extra), out / "hf.log")
            server_scores, server_samples = read_run(out / "server")
            hf_scores, hf_samples = read_run(out / "hf")
            c = compare(server_samples, hf_samples)
            report["adapters"].append({
                "name": name, "adapter_dir": str(adapter_dir), "peft_type": record["peft_type"],
                "num_virtual_tokens": record["num_virtual_tokens"],
                "server_model_args": ",".join(filter(None, [*bos, args.model_args])),
                "scores": {"server": server_scores, "hf": hf_scores}, "comparison": c,
                "agree": (c["max_loglikelihood_diff"] <= args.tolerance
                          and c["identical_generations"] == c["generations"])})
        report["agree"] = all(a["agree"] for a in report["adapters"])
        return report
    finally:
        server.stop()


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    keep = args.workdir is not None
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="lm-eval-agreement-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        report = agreement(args, extra, workdir)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    finally:
        if not keep:
            shutil.rmtree(workdir, ignore_errors=True)
    print_report(report)
    if args.json:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if report["agree"] else 1


if __name__ == "__main__":
    sys.exit(main())
