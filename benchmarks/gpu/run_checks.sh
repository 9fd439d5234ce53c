#!/usr/bin/env bash
# The GPU checks, in two calls that each end within BUDGET_S (default 270 s, the wheel install
# included), from the repository root on any CUDA host:
#
#   CALL=1 bash benchmarks/gpu/run_checks.sh   the most important figures: env, parity
#       (pytest -m gpu), gpu-1b's engine against hf-static-compile (one timed run), and gpu-1b
#       on the vllm engine (--engine vllm) where vLLM is installed (skipped, and said, where not)
#   CALL=2 bash benchmarks/gpu/run_checks.sh   the rest: gpu-8b's engine, gpu-8b on the vllm
#       engine where vLLM is installed (skipped, and said, where not), bf16 agreement, gpu-1b's
#       HTTP server, plain generate and PEFT one request at a time, the host overhead per
#       decode step
#
# STEPS="..." runs the named steps instead (output tagged "steps"); besides the above:
# fairness, fairlong (400-token prompts), fairhttp (the real server over HTTP), fairproc (the
# same with --engine-process), faircap (--contended-tenant-rows 8), longprompts (256-token soft
# prompts over HTTP, prefix cache on and off), gpu8bfull (gpu-8b with every system and
# baseline; give it BUDGET_S=500).
#
# Where .whl holds wheels (benchmarks/gpu/fetch_wheels.sh: what the GPU image lacks), they are
# installed into /tmp/site, which goes ahead of the host's packages on PYTHONPATH.
#
# Output in $OUT (default benchmarks/results): gpu-checks-<call>.log (every printout),
# gpu-checks-<call>.json (each step's command, limit, exit status, seconds and the tail of its
# output, rewritten after every step), gpu-env.json, and the harness JSONs, rewritten after
# each timed run and marked "partial" until the run completes, so a step cut short still leaves
# what it measured. Each step has its own limit, cut to what is left of the budget; a step
# with under MIN_STEP_S left is skipped and recorded as skipped.
#
# QUICK=1 DEVICE=cpu: every step shrunken, on the CPU, to try the script without a GPU (output
# by default in /tmp/gpu-checks-quick, budget 900 s).
set -uo pipefail
[[ -n ${OUT:-} ]] && OUT=$(realpath -m -- "$OUT")
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
CALL=${CALL:-1}
DEVICE=${DEVICE:-cuda}
QUICK=${QUICK:-0}
MIN_STEP_S=${MIN_STEP_S:-20}
KILL_S=10  # a step stopped at its limit gets this long to unwind before it is killed
if [[ $QUICK == 1 ]]; then
    OUT=${OUT:-/tmp/gpu-checks-quick} BUDGET_S=${BUDGET_S:-900}
else
    OUT=${OUT:-$PWD/benchmarks/results} BUDGET_S=${BUDGET_S:-270}
fi
DEADLINE=$(( $(date +%s) + BUDGET_S ))
if [[ -n ${STEPS:-} ]]; then
    TAG=steps
else
    case $CALL in
        1) STEPS="env parity gpu1b gpu1bvllm" ;;
        2) STEPS="gpu8b gpu8bvllm bf16 gpu1bmore overhead" ;;
        *) echo "run_checks: CALL is 1 or 2, not '$CALL'" >&2; exit 2 ;;
    esac
    TAG=call$CALL
fi
mkdir -p "$OUT"
LOG=$OUT/gpu-checks-$TAG.log
REC=$OUT/gpu-checks-$TAG.json
STEP_OUT=$OUT/.gpu-checks-$TAG.step
: > "$LOG"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1 PYTHONPATH=$PWD TOKENIZERS_PARALLELISM=false

record() { python3 benchmarks/gpu/record.py "$REC" "$@"; }

skip() {  # skip NAME REASON
    echo "===== $1: skipped: $2" | tee -a "$LOG"
    record skip "$1" "$2"
}

step() {  # step NAME LIMIT_S COMMAND...: runs it under min(LIMIT_S, what the budget leaves)
    local name=$1 limit=$2 left started rc
    shift 2
    left=$(( DEADLINE - $(date +%s) - KILL_S ))
    if (( left < MIN_STEP_S )); then
        skip "$name" "${left}s of the call's ${BUDGET_S}s budget left"
        return 1
    fi
    (( limit > left )) && limit=$left
    echo "===== $name (limit ${limit}s): $*" | tee -a "$LOG"
    started=$(date +%s)
    timeout -k "$KILL_S" "$limit" "$@" 2>&1 | grep -v --line-buffered "Loading weights" \
        | tee "$STEP_OUT" | tee -a "$LOG"
    rc=${PIPESTATUS[0]}
    echo "===== $name: rc=$rc after $(( $(date +%s) - started ))s" | tee -a "$LOG"
    record step "$name" --limit "$limit" --rc "$rc" --seconds "$(( $(date +%s) - started ))" \
        --output "$STEP_OUT" --command "$*"
    return "$rc"
}

has_vllm() { python3 -c 'import importlib.util, sys; sys.exit(importlib.util.find_spec("vllm") is None)'; }

vllm_step() {  # vllm_step NAME LIMIT_S WORKLOAD: the workload's HTTP server on the vllm engine
    local name=$1 limit=$2 workload=$3
    if has_vllm; then
        step "$name" "$limit" python3 -m benchmarks "$workload" "${h[@]}" --engine vllm \
            --modes http --baselines "" --json "$OUT/$workload-vllm.json"
    else
        skip "$name" "vLLM is not installed on this host, so $workload on the vllm engine is not measured (a vLLM wheel is far too big to carry)"
    fi
}

record start --call "$TAG" --device "$DEVICE" --quick "$QUICK" --budget "$BUDGET_S"
echo "run_checks: $TAG, steps: $STEPS; budget ${BUDGET_S}s; output in $OUT" | tee -a "$LOG"

if [[ $QUICK != 1 ]] && compgen -G ".whl/*.whl" >/dev/null; then  # QUICK: this venv's packages
    if ! step install 90 python3 -m pip install -q --no-index --no-deps --no-compile \
            --no-cache-dir --upgrade --target /tmp/site .whl/*.whl; then
        echo "run_checks: wheel install failed" | tee -a "$LOG"
        record done
        exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD
fi

if [[ $QUICK == 1 ]]; then
    shrink=(--layers 1 --vocab 4096 --requests 4 --adapters 4 --new-tokens 4)
    overhead=(--steps 20 --rows 16)
    fair=(--rounds 2 --cycles 1 --backlog 20)
    bf16=(--rows 4 --new-tokens 4)
    long=(--layers 1 --virtual-tokens 16 --adapters 2 --requests 8 --samples 2 --new-tokens 2
          --modes prefix-cache)
else
    shrink=()
    overhead=()
    fair=(--rounds 20)
    bf16=()
    long=()
fi
if [[ $DEVICE == cuda ]]; then DTYPE=bfloat16; else DTYPE=float32; fi
h=(--device "$DEVICE" "${shrink[@]}" --no-progress --repeats 1)  # the harness runs' flags

for s in $STEPS; do
    case $s in
        env) step env 45 python3 benchmarks/gpu/env_report.py --json "$OUT/gpu-env.json" ;;
        parity) step parity 100 python3 -m pytest -q -p no:cacheprovider -m gpu \
                    tests/engine/test_generation_parity.py tests/engine/test_engine_core.py \
                    tests/engine/test_sampling_near_one.py ;;
        gpu1b) step gpu1b 150 python3 -m benchmarks gpu-1b "${h[@]}" --modes engine \
                   --baselines hf-static-compile --json "$OUT/gpu-1b.json" ;;
        gpu1bvllm) vllm_step gpu1bvllm 120 gpu-1b ;;
        gpu1bmore) step gpu1bmore 120 python3 -m benchmarks gpu-1b "${h[@]}" --modes http \
                       --baselines plain,peft-sequential --json "$OUT/gpu-1b-more.json" ;;
        gpu8b) step gpu8b 120 python3 -m benchmarks gpu-8b "${h[@]}" --modes engine \
                   --baselines "" --json "$OUT/gpu-8b.json" ;;
        gpu8bvllm) vllm_step gpu8bvllm 120 gpu-8b ;;
        gpu8bfull) step gpu8bfull 400 python3 -m benchmarks gpu-8b "${h[@]}" \
                       --json "$OUT/gpu-8b-full.json" ;;
        bf16) step bf16 90 python3 -m benchmarks.bf16_agreement --device "$DEVICE" "${bf16[@]}" ;;
        overhead) step overhead 45 python3 -m benchmarks.step_overhead --device "$DEVICE" \
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
        longprompts) step longprompts 240 python3 benchmarks/long_prompts.py --device "$DEVICE" \
                         --dtype "$DTYPE" "${long[@]}" --json "$OUT/long-prompts.json" ;;
        *) skip "$s" "unknown step" ;;
    esac
done
rm -f "$STEP_OUT"
record done
echo "run_checks: $TAG done in $(( $(date +%s) - DEADLINE + BUDGET_S ))s; files in $OUT" \
    | tee -a "$LOG"
