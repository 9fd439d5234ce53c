#!/usr/bin/env bash
# Run on a GPU host, from the repo root. Where the host's Python lacks this project's packages,
# first put their wheels in .whl (benchmarks/gpu/fetch_wheels.sh, on a machine with network
# access): they are installed into /tmp/site. Then runs the GPU checks named in STEPS in order,
# each under its own time limit. Every printout goes to $OUT/checks.log and the harness JSONs
# to $OUT (rewritten after each timed run, so a step cut short by its limit still leaves what
# it measured, marked "partial"). See docs/benchmarks.md ("GPU checks in one go").
#
#   STEPS="env parity overhead gpu1b" (default; the limits add up to 540 s) or
#   STEPS="bf16 gpu8b" (550 s); optional: fairness (120 s),
#   fairlong (fairness with 400-token prompts, 150 s),
#   fairhttp (fairness through the real server over HTTP, 150 s), fairproc (the same with
#   --engine-process, 150 s), faircap (fairness with the contended cap, which is off by
#   default, set to --contended-tenant-rows 8: does a GPU need it? 120 s),
#   longprompts (256-token soft prompts through HTTP, prefix cache on and off, 240 s)
#   QUICK=1 DEVICE=cpu: shrunken runs on the CPU, to try the script itself without a GPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
OUT=${OUT:-/tmp/gpu-checks}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
STEPS=${STEPS:-env parity overhead gpu1b}
mkdir -p "$OUT"
LOG=$OUT/checks.log
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$PWD

if [[ $QUICK != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then  # QUICK: this venv's packages
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl || { echo "run_checks: wheel install failed" | tee -a "$LOG"; exit 1; }
    export PYTHONPATH=/tmp/site:$PWD
fi

step() {  # step NAME LIMIT_S COMMAND...
    local name=$1 limit=$2 started rc
    shift 2
    echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
    started=$(date +%s)
    timeout -k 20 "$limit" "$@" 2>&1 | grep -v --line-buffered "Loading weights" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "===== $name: rc=$rc after $(( $(date +%s) - started ))s" | tee -a "$LOG"
}

if [[ $QUICK == 1 ]]; then
    harness=(--layers 1 --requests 4 --adapters 4 --new-tokens 4 --modes engine
             --baselines plain --no-progress)
    overhead=(--steps 20 --rows 16)
    fair=(--rounds 2 --cycles 1 --backlog 20)
    bf16=(--rows 4 --new-tokens 4)
    long=(--layers 1 --virtual-tokens 16 --adapters 2 --requests 8 --samples 2 --new-tokens 2
          --modes prefix-cache)
else
    harness=(--no-progress)
    overhead=()
    fair=(--rounds 20)
    bf16=()
    long=()
fi
if [[ $DEVICE == cuda ]]; then DTYPE=bfloat16; else DTYPE=float32; fi

for s in $STEPS; do
    case $s in
        env) step env 60 bash -c 'nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"; git log -1 --format="commit %h %s" 2>/dev/null; python3 -c "
import torch, transformers, peft, fastapi, pydantic
print(\"python torch\", torch.__version__, \"cuda\", torch.version.cuda, \"cudnn\", torch.backends.cudnn.version(), torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"-\")
print(\"transformers\", transformers.__version__, \"peft\", peft.__version__, \"fastapi\", fastapi.__version__, \"pydantic\", pydantic.__version__)"' ;;
        parity) step parity 120 python3 -m pytest -q -p no:cacheprovider -m gpu \
                    tests/engine/test_generation_parity.py tests/engine/test_engine_core.py ;;
        overhead) step overhead 60 python3 -m benchmarks.step_overhead --device "$DEVICE" \
                      "${overhead[@]}" ;;
        fairness) step fairness 120 python3 -m benchmarks fairness --device "$DEVICE" \
                      "${fair[@]}" --json "$OUT/fairness.json" ;;
        fairhttp) step fairhttp 150 python3 benchmarks/fairness.py --device "$DEVICE" \
                      "${fair[@]}" --http ;;
        fairproc) step fairproc 150 python3 benchmarks/fairness.py --device "$DEVICE" \
                      "${fair[@]}" --http --engine-process ;;
        faircap) step faircap 120 python3 -m benchmarks fairness --device "$DEVICE" \
                      "${fair[@]}" --contended-tenant-rows 8 --json "$OUT/faircap.json" ;;
        fairlong) step fairlong 150 python3 benchmarks/fairness.py --device "$DEVICE" \
                      "${fair[@]}" --prompt-tokens 400 ;;
        gpu1b) step gpu1b 300 python3 -m benchmarks gpu-1b --device "$DEVICE" "${harness[@]}" \
                   --batching core --json "$OUT/gpu-1b.json" ;;
        longprompts) step longprompts 240 python3 benchmarks/long_prompts.py --device "$DEVICE" \
                         --dtype "$DTYPE" "${long[@]}" --json "$OUT/long-prompts.json" ;;
        bf16) step bf16 150 python3 -m benchmarks.bf16_agreement --device "$DEVICE" "${bf16[@]}" ;;
        gpu8b) step gpu8b 400 python3 -m benchmarks gpu-8b --device "$DEVICE" "${harness[@]}" \
                   --batching core --repeats 1 \
                   --json "$OUT/gpu-8b.json" ;;
        *) echo "run_checks: unknown step $s" | tee -a "$LOG" ;;
    esac
done
echo "run_checks: done; files in $OUT" | tee -a "$LOG"
