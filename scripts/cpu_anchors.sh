#!/usr/bin/env bash
# CPU speed anchors on a machine with no Rust toolchain (a GPU machine's host, say), from
# binaries built elsewhere (developer-only; not in CI). Each runs pinned to CORES with taskset,
# beside PyTorch in the same run:
#   1. the real-size training step: trainer's bench_step example against scripts/bench_step.py,
#      ROUNDS alternated rounds of 3 steps (scripts/alternate_steps.py);
#   2. its matrix products: the gemm_layouts example against scripts/bench_matmul.py;
#   3. the tiny preset on a 1,500-product catalog for at most LIMIT seconds: seconds per epoch
#      and the share of the pinned cores busy (the epoch profile's cpu_busy).
# The binaries: BIN, a folder with bench_step, gemm_layouts and trainer (CPU builds), or, by
# default, the .xz files that `scripts/build_cuda.sh` packs into .cuda-build/cpu/ (unpacked with
# Python's lzma). Needs python3 with torch and transformers.
#
#   CORES=0,1 ROUNDS=2 LIMIT=150 bash scripts/cpu_anchors.sh
set -euo pipefail
cd "$(dirname "$0")/.."
CORES=${CORES:-0,1}
ROUNDS=${ROUNDS:-2}
LIMIT=${LIMIT:-150}
WORK=${WORK:-/tmp/moda-cpu-anchors}
threads=$(taskset -c "$CORES" nproc)
rm -rf "$WORK"
mkdir -p "$WORK"
if [ -z "${BIN:-}" ]; then
    BIN=$WORK/bin
    mkdir -p "$BIN"
    for f in bench_step gemm_layouts trainer; do
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            ".cuda-build/cpu/$f.xz" "$BIN/$f"
        chmod +x "$BIN/$f"
    done
fi
pin() { OMP_NUM_THREADS=$threads RAYON_NUM_THREADS=$threads taskset -c "$CORES" "$@"; }
lscpu | grep -E '^(Model name|Model|CPU\(s\)|L1d|L2|L3)' || true
echo "pinned to CPUs $CORES ($threads)"

echo "== 1. real-size training step ($ROUNDS alternated rounds of 3 steps)"
pin python3 scripts/alternate_steps.py "$ROUNDS" 3 candle="$BIN/bench_step" \
    torch="python3 scripts/bench_step.py"

echo "== 2. the step's matrix products"
for _ in $(seq "$ROUNDS"); do
    pin "$BIN/gemm_layouts" 5
    pin python3 scripts/bench_matmul.py 5
done

echo "== 3. tiny preset, at most ${LIMIT} s"
pin "$BIN/trainer" synth --out "$WORK/catalog" --count 1500 --seed 64 >/dev/null
pin timeout "$LIMIT" "$BIN/trainer" fit --data "$WORK/catalog" --preset tiny \
    --out "$WORK/tiny" --quiet || true
python3 - "$WORK/tiny/metrics.jsonl" <<'PY'
import json, statistics, sys
try:
    lines = open(sys.argv[1]).read().splitlines()
except OSError:
    sys.exit("no metrics.jsonl: the fit did not start")
epochs = [json.loads(l) for l in lines if '"kind":"epoch"' in l]
if not epochs:
    sys.exit("no epoch finished")
secs = [e["seconds"] for e in epochs]
busy = [e["profile"]["cpu_busy"] for e in epochs if e["profile"]["cpu_busy"] is not None]
print(f"{len(epochs)} epochs: {min(secs):.2f}-{max(secs):.2f} s each (median "
      f"{statistics.median(secs):.2f}); pinned cores busy {min(busy):.2f}-{max(busy):.2f} "
      f"(median {statistics.median(busy):.2f})")
PY
