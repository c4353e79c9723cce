#!/usr/bin/env bash
# The one command a session with a GPU runs (issue 31): on the H200 machine, from the repository root,
#
#     bash bench/gpu_run.sh              # with bench/wheels/ carried (scripts/build_gpu_wheels.sh builds it)
#     bash bench/gpu_run.sh --tiny       # the whole script on the CPU in about a minute (CI runs it)
#
# In order, each step under its own `timeout` (capped to what is left of the budget, so one slow step or variant
# cannot eat the rest): installs the carried wheels of the packages the machine lacks, `pip install --no-deps -e .`,
# prints versions and `nvidia-smi`, runs the `gpu`-marked tests (HF_CPT_GPU_TESTS=1), the correctness checks
# (bench/gpu_checks.py), the loss micro-bench (bench/gpu_loss.py), the throughput variants (a)-(f) at sequence
# 2048 and 4096 (bench/gpu_throughput.py, one process per variant), a profile of (b) and (c), and the Llama-3.2-3B
# shape if time is left. Everything goes to $OUT (a temporary directory when unset): gpu_run.log (all output)
# and gpu_results.json (every number, each step's exit code and time). Total: at most GPU_RUN_BUDGET_S seconds
# (default 465, so a `run` call with timeout_s 560 has room for the machine's start and the transfers).
# --tiny: the CPU smoke shape, few steps, no installs; CUDA-only pieces print why they are skipped.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
export ROOT
cd "$ROOT"
TINY=0
for arg in "$@"; do
    case "$arg" in
        --tiny) TINY=1 ;;
        -h|--help) sed -n '2,15p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_run.sh: unknown argument $arg (use --tiny or nothing)" >&2; exit 2 ;;
    esac
done

export PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d -t hfcpt-gpu-run.XXXXXX)}
mkdir -p "$OUT"
PARTS=$(mktemp -d -t hfcpt-gpu-parts.XXXXXX)  # one JSON per step, merged into $OUT/gpu_results.json at the end
trap 'rm -rf "$PARTS"' EXIT
if (( TINY )); then
    BUDGET=${GPU_RUN_BUDGET_S:-300}
    export CUDA_VISIBLE_DEVICES=""  # the smoke shape runs on the CPU, even on a GPU machine
    T=(--tiny)
else
    BUDGET=${GPU_RUN_BUDGET_S:-465}
    T=()
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
export TRANSFORMERS_NO_ADVISORY_WARNINGS=1 HF_DATASETS_DISABLE_PROGRESS_BARS=1
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # hf_cpt importable even if the editable install fails

# step NAME CAP_S CMD...: run CMD under `timeout`, capped to the budget left; record its exit code and seconds.
step() {
    local name=$1 cap=$2
    shift 2
    local left=$(( BUDGET - SECONDS ))
    if (( left < 20 )); then
        echo "=== [$name] skipped: ${left} s of the ${BUDGET} s budget left"
        printf '%s\tskipped\t0\t0\n' "$name" >> "$PARTS/steps.tsv"
        return 0
    fi
    (( cap > left - 5 )) && cap=$(( left - 5 ))
    echo "=== [$name] cap ${cap} s, ${left} s of the budget left: $*"
    local t0=$SECONDS rc=0
    if declare -F "$1" > /dev/null; then  # a function of this script: `timeout` runs it in a fresh bash
        timeout --kill-after=10 "$cap" bash -c "set -euo pipefail; $(declare -f "$1"); $(printf '%q ' "$@")" || rc=$?
    else
        timeout --kill-after=10 "$cap" "$@" || rc=$?
    fi
    (( rc == 124 || rc == 137 )) && echo "=== [$name] hit its ${cap} s cap"
    echo "=== [$name] exit ${rc} after $(( SECONDS - t0 )) s"
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( SECONDS - t0 ))" "$cap" >> "$PARTS/steps.tsv"
}

# skip NAME WHY: a step that cannot run here, with the reason in the log and the results
skip() {
    echo "=== [$1] skipped: $2"
    printf '%s\tskipped: %s\t0\t0\n' "$1" "$2" >> "$PARTS/steps.tsv"
}

# env_report FILE: versions of the packages the benches use, and which are missing (one cheap import check)
env_report() {
    "$PY" - "$1" <<'EOF'
import importlib, importlib.metadata as md, json, platform, sys
mods = {"torch": "torch", "transformers": "transformers", "accelerate": "accelerate", "peft": "peft",
        "typer": "typer", "matplotlib": "matplotlib", "triton": "triton", "datasets": "datasets",
        "pyarrow": "pyarrow", "pandas": "pandas", "fsspec": "fsspec", "dill": "dill", "multiprocess": "multiprocess",
        "xxhash": "xxhash", "gguf": "gguf", "liger_kernel": "liger-kernel", "cut_cross_entropy": "cut-cross-entropy",
        "trl": "trl", "huggingface_hub": "huggingface-hub", "hf_cpt": "hf-cpt"}
found, missing = {}, {}
for mod, dist in mods.items():
    try:
        importlib.import_module(mod)
    except Exception as e:  # a broken install is as missing as an absent one
        missing[dist] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
        continue
    try:
        found[dist] = md.version(dist)
    except md.PackageNotFoundError:
        found[dist] = "(no metadata: from the source tree)"
import torch
cuda = {"available": torch.cuda.is_available(), "version": torch.version.cuda}
if cuda["available"]:
    cuda.update(device=torch.cuda.get_device_name(),
                memory_gib=torch.cuda.get_device_properties(0).total_memory / 2**30)
print(f"python {platform.python_version()} ({sys.executable}); CUDA: {cuda}")
print("found:   " + ", ".join(f"{k} {v}" for k, v in found.items()))
print("missing: " + (", ".join(f"{k} ({v})" for k, v in missing.items()) or "none"))
json.dump({"python": platform.python_version(), "executable": sys.executable, "cuda": cuda, "found": found,
           "missing": missing}, open(sys.argv[1], "w"), indent=1)
EOF
}

# install_wheels: the carried wheels whose distribution is not installed here (the machine's own versions win)
install_wheels() {
    local dir=bench/wheels
    if [[ ! -d $dir ]] || ! compgen -G "$dir/*.whl" > /dev/null; then
        echo "no $dir/*.whl: nothing to install (build them with scripts/build_gpu_wheels.sh and carry $dir)"
        return 0
    fi
    local wanted
    wanted=$("$PY" - "$dir" <<'EOF'
import importlib.metadata as md, pathlib, re, sys
for whl in sorted(pathlib.Path(sys.argv[1]).glob("*.whl")):
    dist = re.sub(r"[-_.]+", "-", whl.name.split("-")[0]).lower()
    try:
        print(f"  keep {dist} {md.version(dist)} (installed; carried: {whl.name})", file=sys.stderr)
    except md.PackageNotFoundError:
        print(whl)
EOF
)
    if [[ -z $wanted ]]; then
        echo "every carried wheel is installed already"
        return 0
    fi
    # --no-deps: the carried set is complete for this machine; a resolver would refuse an upper bound (e.g. datasets'
    # fsspec pin) over a version that works, so `pip check` below reports such mismatches instead
    # shellcheck disable=SC2086
    "$PY" -m pip install --no-index --no-deps --no-cache-dir --disable-pip-version-check --find-links "$dir" $wanted
    "$PY" -m pip check || echo "(pip check reports the mismatches above; the benches only need the imports to work)"
}

install_project() {
    "$PY" -m pip install --no-index --no-deps --no-build-isolation --disable-pip-version-check -q -e . \
        || echo "editable install failed: hf_cpt is imported from the tree through PYTHONPATH=$ROOT"
}

gpu_tests() {
    local files
    files=$(grep -rl --include='*.py' "mark.gpu" tests || true)
    if [[ -z $files ]]; then
        echo "no gpu-marked tests under tests/"
        return 0
    fi
    # shellcheck disable=SC2086
    HF_CPT_GPU_TESTS=1 "$PY" -m pytest -m gpu -q -p no:cacheprovider -o addopts="-ra" $files
}

merge_results() {
    "$PY" - "$PARTS" "$OUT/gpu_results.json" "$TINY" "$BUDGET" "$SECONDS" <<'EOF'
import json, pathlib, sys, time
parts, out = pathlib.Path(sys.argv[1]), pathlib.Path(sys.argv[2])
def load(name):
    try:
        return json.loads((parts / f"{name}.json").read_text())
    except (OSError, ValueError):
        return None
steps = {}
for line in (parts / "steps.tsv").read_text().splitlines() if (parts / "steps.tsv").exists() else []:
    name, rc, seconds, cap = line.split("\t")
    steps[name] = {"exit": int(rc) if rc.lstrip("-").isdigit() else rc, "seconds": int(seconds), "cap": int(cap)}
throughput = {}
for path in sorted(parts.glob("throughput_*.json")):  # {shape: {seqN: {variant: record}}}
    part = load(path.stem)
    if part:
        throughput.setdefault(part["shape"], {"device": part["device"], "vocab": part["vocab"]}).update(part["runs"])
result = {"meta": {"date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "tiny": sys.argv[3] == "1",
                   "budget_s": int(sys.argv[4]), "elapsed_s": int(sys.argv[5])},
          "steps": steps, "env": load("env_after") or load("env_before"), "env_before": load("env_before"),
          "checks": load("checks"), "loss": load("loss"), "throughput": throughput, "profile": load("profile")}
out.write_text(json.dumps(result, indent=1, default=str))
print(f"results: {out} ({len(steps)} steps)")
EOF
}

main() {
    echo "hf-cpt GPU run: $(date -u '+%Y-%m-%d %H:%M:%S UTC')," \
         "tree $(git rev-parse --short HEAD 2>/dev/null || echo '?')" \
         "$(git status --porcelain 2>/dev/null | grep -q . && echo '(with uncommitted changes)'), OUT=$OUT," \
         "budget ${BUDGET} s$( (( TINY )) && echo ', --tiny (CPU)')"
    step env_before 60 env_report "$PARTS/env_before.json"
    if (( TINY )); then
        skip install_wheels "--tiny installs nothing (this environment stays as it is)"
        skip install_project "--tiny installs nothing (hf_cpt comes from the tree through PYTHONPATH)"
    else
        step install_wheels 90 install_wheels
        step install_project 60 install_project
        step env_after 60 env_report "$PARTS/env_after.json"
    fi
    if command -v nvidia-smi > /dev/null; then
        step nvidia_smi 20 nvidia-smi
    else
        skip nvidia_smi "nvidia-smi not found (no NVIDIA driver on this machine)"
    fi
    step gpu_tests 90 gpu_tests
    step checks 120 "$PY" bench/gpu_checks.py "${T[@]}" --json "$PARTS/checks.json"
    local tp=(bench/gpu_throughput.py "${T[@]}")
    if (( TINY )); then
        tp+=(--steps 1 --warmup 1 --isolate none)
        step loss 60 "$PY" bench/gpu_loss.py --tiny --repeats 1 --json "$PARTS/loss.json"
        step throughput_tiny_seq64 120 "$PY" "${tp[@]}" --json "$PARTS/throughput_tiny_seq64.json"
        skip throughput_1b "--tiny runs the tiny shape at one sequence length, all variants in one process"
        step profile 60 "$PY" "${tp[@]}" --steps 2 --variants hfcpt --profile --json "$PARTS/profile.json"
        skip throughput_3b_seq2048 "the Llama-3.2-3B shape is for the GPU"
    else
        tp+=(--variant-timeout 75)
        step throughput_1b_seq2048 200 "$PY" "${tp[@]}" --seqs 2048 --json "$PARTS/throughput_1b_seq2048.json"
        step loss 90 "$PY" bench/gpu_loss.py --json "$PARTS/loss.json"
        step throughput_1b_seq4096 200 "$PY" "${tp[@]}" --seqs 4096 --json "$PARTS/throughput_1b_seq4096.json"
        step profile 75 "$PY" "${tp[@]}" --seqs 2048 --steps 2 --warmup 2 --variants trainer_liger,hfcpt --profile \
            --json "$PARTS/profile.json"
        step throughput_3b_seq2048 120 "$PY" "${tp[@]}" --shape 3b --seqs 2048 \
            --variants trainer_liger,hfcpt,hfcpt_chunked --json "$PARTS/throughput_3b_seq2048.json"
    fi
    merge_results
    local failed
    failed=$(awk -F'\t' '$2 != "0" && $2 !~ /^skipped/ {print $1}' "$PARTS/steps.tsv" | tr '\n' ' ')
    echo "done in ${SECONDS} s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
    if [[ -n $failed ]]; then
        echo "steps that failed: $failed"
        return 1
    fi
    echo "every step passed or was skipped with its reason"
}

main 2>&1 | tee "$OUT/gpu_run.log"
