#!/usr/bin/env bash
# Downloads into bench/wheels/ (git-ignored) the wheels bench/gpu_run.sh installs on the GPU machine, which has no
# network: the packages hf-cpt and the benches need that its image lacks, for its Python 3.12 (x86-64 Linux).
#
#     bash scripts/build_gpu_wheels.sh [DEST]          # then carry it: run(..., carry=["bench/wheels"])
#
# The machine's image (docs: the device notes' package list) has torch 2.11 + CUDA, triton, transformers,
# accelerate, peft, typer, matplotlib, pyarrow, pandas, fsspec, xxhash, huggingface-hub; it lacks the ones below.
# Pure-Python wheels all, about 3 MiB in all; the script refuses a set over MAX_MIB (default 55: the working tree
# that travels is capped at 64 MiB). Needs only pip and PyPI.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=${1:-$ROOT/bench/wheels}
PY=${PYTHON:-python3}
MAX_MIB=${MAX_MIB:-55}

PACKAGES=(
    # datasets: 4.8 is the newest line that accepts pyarrow >= 21 (5.x needs >= 24) and huggingface-hub 1.x, so the
    # machine's own pyarrow serves (its wheel alone would be 47 MiB); project pin: datasets >= 3.0
    "datasets==4.8.5"
    "dill==0.4.1"              # datasets: dill < 0.4.2
    "multiprocess==0.70.19"    # datasets: multiprocess < 0.70.20; needs dill >= 0.4.1
    "gguf==0.19.0"             # hf-cpt: gguf >= 0.10 (the embedded model's conversion)
    "liger-kernel==0.8.5"      # variant (b), Liger checks and the loss bench; hf-cpt[liger]: >= 0.5
    "cut-cross-entropy==25.1.1"  # the loss bench (Apple's CCE)
    "trl==1.16.0"              # hf-cpt[dev]: trl >= 1.0 (TRL-based tests); needs datasets >= 4.7
)

rm -rf "$DEST"
mkdir -p "$DEST"
"$PY" -m pip download --disable-pip-version-check --only-binary=:all: --no-deps \
    --python-version 3.12 --implementation cp --abi cp312 \
    --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    -d "$DEST" "${PACKAGES[@]}"

count=$(find "$DEST" -name '*.whl' | wc -l)
if (( count != ${#PACKAGES[@]} )); then
    echo "expected ${#PACKAGES[@]} wheels in $DEST, found $count" >&2
    exit 1
fi
bytes=$(du -cb "$DEST"/*.whl | tail -1 | cut -f1)
ls -l "$DEST"
echo "$count wheels, $(( bytes / 1024 )) KiB in $DEST"
if (( bytes > MAX_MIB * 1024 * 1024 )); then
    echo "the wheels take more than ${MAX_MIB} MiB; the tree that travels to the GPU machine is capped at 64 MiB" >&2
    exit 1
fi
