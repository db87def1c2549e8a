#!/usr/bin/env bash
# The GPU path's checks and issue 25's GPU rows as one prepared run on a lent GPU machine (the `device` tool),
# which starts bare, reaches no registry and has its own torch and triton (Python 3.12).
#
#   bash bench/gpu_check.sh wheels     # here, once: .whl/ = what the checks import that the GPU image lacks
#   bash bench/gpu_check.sh run        # there: run with carry [".whl"], timeout_s 600
#
# On a GPU machine of your own with the project installed (the gpu extra), `run` alone: without .whl/ it uses
# the environment's packages.
#
# `run` writes under $OUT (default out/gpu):
#   env.txt          the GPU, its driver, the versions of python, torch, triton and fla
#   fla_cuda.*       tests/fla_check.py --device cuda: fla's chunk_kda, compiled and autotuned, against the float64
#                    references in the checks CI runs under Triton's interpreter (the op, packed sequences, the
#                    KDA layer with its fused pre-ops)
#   kda_check.*      bench/kda_check.py: the op at T 1000, bf16 and fp32 inputs, against float64
#   train_2k.*       bench/train_throughput.py's H100 table in two processes, the short one first: the xs hybrid
#   train_long.*     vs a same-size GPT, training at T 2k, then 8k/16k, decoding at 4k, then 32k; the KDA layer
#                    vs its op
#   bench_kda.*      bench/kda.py: chunk_kda vs our chunked op vs SDPA flash attention
# (a .json each, and a .log of its output). Each step has its own time limit, so one that hangs or fails leaves
# the others' results; the exit status is the number of steps that failed. Record what it measured in
# docs/benchmarks.md with the machine and the date.
set -u
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}

if [ "${1:-}" = wheels ]; then
    # pinned as in requirements.lock; the image has torch, triton, einops, numpy, tqdm, pyyaml and safetensors
    exclude=$(git rev-parse --git-path info/exclude)
    mkdir -p "$(dirname "$exclude")"
    grep -qx "/$WHEELS/" "$exclude" 2>/dev/null || echo "/$WHEELS/" >> "$exclude"
    exec python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" fla-core==0.6.0 pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 \
        typing-inspection==0.4.5
elif [ "${1:-}" != run ]; then
    echo "usage: bash bench/gpu_check.sh wheels|run" >&2
    exit 2
fi

OUT=${OUT:-out/gpu}
mkdir -p "$OUT"
if [ -d "$WHEELS" ]; then         # else the environment's own packages (the project installed with the gpu extra)
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
        "$WHEELS"/*.whl || { echo "could not install $WHEELS/*.whl" >&2; exit 1; }
    export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=${PYTHONPATH:+$PYTHONPATH:}$PWD PYTHONUNBUFFERED=1
{
    date -u
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
    python3 -c 'import sys, torch, triton, fla; print("python", sys.version.split()[0], "torch", torch.__version__,
                "cuda", torch.version.cuda, "triton", triton.__version__, "fla", fla.__version__)'
} > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

failed=0
step() {            # step NAME SECONDS COMMAND...: its output to $OUT/NAME.log; its status counted
    local name=$1 limit=$2
    shift 2
    echo "== $name (at most ${limit} s): $*"
    local t0=$SECONDS
    timeout -k 10 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "== $name: exit $rc after $((SECONDS - t0)) s"
    tail -n 25 "$OUT/$name.log"
    [ "$rc" -eq 0 ] || failed=$((failed + 1))
}

step fla_cuda 110 bash -c "python3 tests/fla_check.py --device cuda > '$OUT/fla_cuda.json'"
[ -s "$OUT/fla_cuda.json" ] && python3 -c 'import json, sys
for check, errors in json.load(open(sys.argv[1])).items():
    worst = max(errors, key=errors.get)
    print(f"{check:16} worst relative error {errors[worst]:.2e} ({worst})")' "$OUT/fla_cuda.json"
step kda_check 50 python3 bench/kda_check.py --out "$OUT/kda_check.json"
step train_2k 110 python3 bench/train_throughput.py --seq 2048 --decode-context 4096 --out "$OUT/train_2k.json"
step train_long 180 python3 bench/train_throughput.py --seq 8192 16384 --decode-context 32768 \
    --out "$OUT/train_long.json"
step bench_kda 80 python3 bench/kda.py --repeats 5 --out "$OUT/bench_kda.json"
echo "== $failed step(s) failed"
exit "$failed"
