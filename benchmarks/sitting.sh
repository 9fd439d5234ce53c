#!/usr/bin/env bash
# Every workload of benchmarks/RESULTS.md, one after the other, at one commit: one sitting.
#
#   PY=.venv/bin/python VLLM_PY=.venv-vllm/bin/python LM_EVAL=<lm-eval env>/bin/lm_eval \
#   GUIDELLM=... AIPERF=... LITELLM_PYTHON=... bash benchmarks/sitting.sh
#
# Run it on a quiet machine and leave the machine alone: the figures are only comparable
# within a sitting where nothing else ran. JSON goes to OUT (default benchmarks/results), each
# step's output to OUT/sitting-logs/NN-name.log, and one line per step ("sitting: NAME took N
# s, exit status S") to OUT/sitting-logs/steps.txt. A failed step does not stop the rest.
# Steps that need vLLM's environment run only when VLLM_PY is set; the lm-eval steps only when
# LM_EVAL is set; STEPS (space-separated names) runs a subset. About two hours on a 2-core CPU.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

PY=${PY:-python}
OUT=${OUT:-benchmarks/results}
LOGS=$OUT/sitting-logs
mkdir -p "$LOGS"
export VLLM_NO_USAGE_STATS=1
n=0

step() {  # step NAME COMMAND...
    local name=$1 start=$SECONDS status=0
    shift
    n=$((n + 1))
    if [[ -n ${STEPS:-} && " $STEPS " != *" $name "* ]]; then return 0; fi
    local log
    log=$(printf '%s/%02d-%s.log' "$LOGS" "$n" "$name")
    echo "sitting: $name started $(date -u +%H:%M:%S): $*" | tee -a "$LOGS/steps.txt"
    "$@" >"$log" 2>&1 || status=$?
    echo "sitting: $name took $((SECONDS - start)) s, exit status $status" | tee -a "$LOGS/steps.txt"
}

vllm_step() {  # the same, in vLLM's environment, when there is one
    local name=$1
    shift
    if [[ -z ${VLLM_PY:-} ]]; then
        echo "sitting: $name skipped (VLLM_PY unset)" | tee -a "$LOGS/steps.txt"
        return 0
    fi
    step "$name" "$VLLM_PY" "$@"
}

# merge_runs OUT IN...: fairness.py writes one run per file; the table reads them together.
merge_runs() {
    "$PY" - "$@" <<'EOF'
import json, sys
out, paths = sys.argv[1], sys.argv[2:]
runs = [json.load(open(p)) for p in paths]
json.dump({"command": runs[0].get("command", ""), "runs": runs}, open(out, "w"), indent=2)
EOF
}

echo "sitting: commit $(git rev-parse --short HEAD), $(date -u +%Y-%m-%dT%H:%M:%SZ)" | tee "$LOGS/steps.txt"

step store "$PY" benchmarks/store_bench.py --repeats 30
step bf16 "$PY" -m benchmarks.bf16_agreement
for i in 1 2 3; do step "step-overhead-$i" "$PY" -m benchmarks.step_overhead; done
step cpu-ref "$PY" -m benchmarks cpu-ref --overhead-requests 100 --no-progress
step soak-30 "$PY" -m benchmarks soak --minutes 30 --torch-threads 1 --json "$OUT/soak.json"
step mixed-lengths "$PY" -m benchmarks mixed-lengths --repeats 1 --no-progress
step many-adapters "$PY" -m benchmarks many-adapters --repeats 1 --no-progress
step long-prompts "$PY" benchmarks/long_prompts.py --json "$OUT/long-prompts.json"
vllm_step long-prompts-vllm benchmarks/long_prompts.py --engine vllm --modes prefix-cache \
    --requests 64 --samples 16 --json "$OUT/long-prompts-vllm.json"
step ttft-prompt-length "$PY" -m benchmarks.plots.ttft_prompt_length
step templates-prefix "$PY" benchmarks/long_prompts.py --virtual-tokens 20 --requests 128 \
    --samples 16 --json "$OUT/templates-prefix.json"
step templates-template "$PY" benchmarks/long_prompts.py --virtual-tokens 20 --requests 128 \
    --samples 16 --template "{soft:10} Review: {text} {soft} Sentiment:" \
    --json "$OUT/templates-template.json"
for i in 1 2; do
    step "fairness-engine-$i" "$PY" benchmarks/fairness.py --json "$OUT/fairness-engine-$i.json"
done
step fairness-engine-cap8 "$PY" benchmarks/fairness.py --contended-tenant-rows 8 \
    --json "$OUT/fairness-engine-cap8.json"
step fairness-engine-fifo "$PY" benchmarks/fairness.py --policy fifo \
    --json "$OUT/fairness-engine-fifo.json"
step fairness-timeline "$PY" -m benchmarks.plots.fairness_timeline
for engine in builtin vllm; do
    run=$PY
    if [[ $engine == vllm ]]; then run=${VLLM_PY:-}; fi
    if [[ -z $run ]]; then continue; fi
    for i in 1 2 3; do
        step "fairness-http-$engine-$i" "$run" benchmarks/fairness.py --http --engine "$engine" \
            --json "$OUT/fairness-http-$engine-$i.json"
        step "fairness-http-cap8-$engine-$i" "$run" benchmarks/fairness.py --http \
            --engine "$engine" --contended-tenant-rows 8 \
            --json "$OUT/fairness-http-cap8-$engine-$i.json"
    done
done
for engine in builtin vllm; do
    for stem in fairness-http fairness-http-cap8; do
        mapfile -t parts < <(ls "$OUT/$stem-$engine"-[0-9].json 2>/dev/null)
        if ((${#parts[@]})); then
            merge_runs "$OUT/$stem-$engine.json" "${parts[@]}" && rm -f "${parts[@]}"
        fi
    done
done
vllm_step cpu-ref-vllm -m benchmarks cpu-ref --engine vllm --repeats 3 --no-progress
vllm_step cpu-ref-builtin-vllm-peer -m benchmarks cpu-ref --modes http --baselines vllm-peer \
    --repeats 3 --no-progress --json "$OUT/cpu-ref-builtin-vllm-peer.json"
vllm_step adapter-scaling -m benchmarks.plots.adapter_scaling --engine both \
    --counts 1,64,1024 --repeats 1
for i in 1 2 3; do
    step "soak-hostile-$i" "$PY" -m benchmarks soak --minutes 0.3 --torch-threads 1 \
        --json "$OUT/soak-hostile-$i.json"
done
for i in 1 2 3; do
    step "soak-hostile-engine-process-$i" "$PY" -m benchmarks soak --minutes 0.3 \
        --torch-threads 1 --engine-process --json "$OUT/soak-hostile-engine-process-$i.json"
done
step tools "$PY" -m benchmarks tools --json "$OUT/tools.json"
step cpu-contention "$PY" -m benchmarks cpu-contention --json "$OUT/cpu-contention.json"
if [[ -n ${LM_EVAL:-} ]]; then
    step lm-eval "$PY" benchmarks/lm_eval/run.py --lm-eval "$LM_EVAL"
    step lm-eval-agreement "$PY" benchmarks/lm_eval/agreement.py --lm-eval "$LM_EVAL" \
        --limit 40 --json "$OUT/lm-eval-agreement.json"
else
    echo "sitting: lm-eval skipped (LM_EVAL unset)" | tee -a "$LOGS/steps.txt"
fi
echo "sitting: done $(date -u +%H:%M:%S)" | tee -a "$LOGS/steps.txt"
