#!/usr/bin/env bash
# Run on a machine with network access, in any directory: downloads into <repo>/.whl the wheels
# a GPU host's Python 3.12 (x86-64) needs at the versions of constraints.txt, for a host whose
# image already has torch (CUDA), numpy, safetensors, accelerate, httpx and the rest but not
# this project's other packages, or older ones. benchmarks/gpu/run_checks.sh installs them; see
# docs/benchmarks.md ("GPU checks in one go").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl

# Ours at the pinned versions (the image's transformers, tokenizers and huggingface_hub are
# older), plus what they need that the image does not hold.
names=(transformers tokenizers huggingface_hub hf-xet peft fastapi starlette uvicorn pydantic
       pydantic_core pydantic-settings python-dotenv typing-inspection annotated-types
       typing_extensions python-multipart prometheus_client pytest pluggy iniconfig
       pytest-asyncio pytest-timeout regex)
platforms=()
for tag in manylinux_2_28 manylinux_2_27 manylinux_2_17 manylinux2014 manylinux1 manylinux_2_24 manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
for name in "${names[@]}"; do
    pin=$(grep -i "^${name}==" constraints.txt | head -1)
    if [[ -z $pin ]]; then
        echo "fetch_wheels: $name is not pinned in constraints.txt" >&2
        exit 1
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp "${platforms[@]}" -d .whl "$pin"
done
ls .whl
du -sh .whl
