#!/usr/bin/env bash
# Run HERE (not on the device), in any directory: downloads into <repo>/.whl the wheels the
# device machine's image lacks or holds at other versions than constraints.txt, for its
# Python 3.12 on x86-64. The image already has torch (CUDA), numpy, safetensors, accelerate,
# httpx and the rest; see docs/benchmarks.md ("GPU checks in one device call").
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
