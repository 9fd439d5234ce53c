#!/usr/bin/env bash
# Run on a machine with network access, in any directory: downloads into <repo>/.whl exactly
# the wheels the GPU image lacks, for its CPython 3.12 on manylinux x86-64: the packages named
# in benchmarks/gpu/carried.txt, at constraints.txt's versions, one at a time without their
# dependencies. Everything else comes from the image (shared/gpu-host-packages.txt): its CUDA
# torch, transformers, tokenizers, huggingface_hub, peft, pytest and the rest, and the project
# itself travels as the checkout. tests/benchmarks/test_gpu_image.py checks that the image's
# packages plus these wheels are enough. benchmarks/gpu/run_checks.sh installs them. Prints
# each wheel's size and the total with the checkout's files, which must stay under 64 MiB.
# See docs/benchmarks.md ("GPU checks in two calls").
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
LIMIT_MIB=64
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
mkdir -p .whl
rm -f .whl/*.whl  # exactly the list: nothing left over from an older selection

platforms=()
for tag in manylinux2014 manylinux_2_17 manylinux_2_24 manylinux_2_27 manylinux_2_28 \
           manylinux_2_31 manylinux_2_34 manylinux_2_35; do
    platforms+=(--platform "${tag}_x86_64")
done
mapfile -t names < <(sed 's/#.*//' benchmarks/gpu/carried.txt | xargs -n1)
for name in "${names[@]}"; do
    # constraints.txt spells a name with -, _ or . as it likes; they are the same name.
    pattern=$(sed 's/[-_.]/[-_.]/g' <<<"$name")
    pin=$(grep -i -E "^${pattern}==" constraints.txt | head -1 || true)
    if [[ -z $pin ]]; then
        echo "fetch_wheels: $name is not pinned in constraints.txt" >&2
        exit 1
    fi
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --abi cp312 --abi abi3 --abi none "${platforms[@]}" -d .whl "$pin"
done

count=$(find .whl -maxdepth 1 -type f -name '*.whl' | wc -l)
if (( count != ${#names[@]} )); then
    echo "fetch_wheels: ${#names[@]} packages listed, $count wheels in .whl" >&2
    exit 1
fi
mib() { awk -v b="$1" 'BEGIN { printf "%.2f", b / 1048576 }'; }
for w in .whl/*.whl; do
    printf '%8s MiB  %s\n' "$(mib "$(stat -c %s "$w")")" "${w#.whl/}"
done
wheels=$(cat .whl/*.whl | wc -c)
# What travels to a GPU host: the checkout's files (tracked and untracked, not ignored) and .whl.
checkout=$(git ls-files -z --cached --others --exclude-standard | xargs -0 cat 2>/dev/null | wc -c)
total=$(( wheels + checkout ))
echo "fetch_wheels: $count wheels, $(mib "$wheels") MiB; with the checkout ($(mib "$checkout")" \
    "MiB): $(mib "$total") MiB of ${LIMIT_MIB} MiB"
if (( total > LIMIT_MIB * 1048576 )); then
    echo "fetch_wheels: over ${LIMIT_MIB} MiB" >&2
    exit 1
fi
