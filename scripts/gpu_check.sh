#!/usr/bin/env bash
# The trainer's CUDA check, run from the repository root on a machine with an NVIDIA GPU and
# no Rust toolchain (the device machine: nvcc 13.0, PyTorch, transformers). The binaries come
# from scripts/build_cuda.sh (.cuda-build/trainer.xz, .cuda-build/cuda-tests.xz), unpacked
# here with Python's lzma.
#
#   bash scripts/gpu_check.sh
#
# 1. the CUDA tests (tests/tests/cuda.rs; their printed figures shown, passing or not);
# 2. `trainer synth --count 2906`, the catalog size of the original report;
# 3. random backbones of the real architecture (CLIP ViT-B/32 with a 512-wide projection,
#    OPT-125m), written by transformers (scripts/random_backbones.py), with a byte-level BPE
#    trained on the catalog's captions (from a one-step `--preset tiny` run);
# 4. `trainer fit --device cuda` with the original recipe's settings (20 epochs, batch 32,
#    accumulation 8, AdamW 1e-3, StepLR), then `trainer eval --device cuda`.
# Results (log, metrics.jsonl, loss.png, eval JSON, GPU memory samples) go to $OUT.
#
# Environment: BIN (the unpacked binaries, or a folder with trainer and cuda-tests), DEVICE (cuda), COUNT (2906), EPOCHS (20),
# WORK (scratch, /tmp/moda-gpu), OUT (results, ./gpu-check-out), SMALL=1 (small backbones,
# for a dry run on a CPU with DEVICE=cpu), TESTS=0 (skip step 1, for that dry run).
set -euo pipefail
BIN=${BIN:-}
DEVICE=${DEVICE:-cuda}
COUNT=${COUNT:-2906}
EPOCHS=${EPOCHS:-20}
WORK=${WORK:-/tmp/moda-gpu}
OUT=${OUT:-$PWD/gpu-check-out}
SMALL=${SMALL:-0}
TESTS=${TESTS:-1}
mkdir -p "$OUT"
rm -rf "$WORK"
mkdir -p "$WORK"
exec > >(tee "$OUT/gpu_check.log") 2>&1
log() { echo "[$(date +%T)] $*"; }

if [ -z "$BIN" ]; then
    BIN=$WORK/bin
    mkdir -p "$BIN"
    for f in trainer cuda-tests; do
        python3 -c 'import lzma, shutil, sys; shutil.copyfileobj(lzma.open(sys.argv[1]), open(sys.argv[2], "wb"))' \
            ".cuda-build/$f.xz" "$BIN/$f"
        chmod +x "$BIN/$f"
    done
fi

# The CUDA libraries the binaries link: those of the image's PyTorch wheels (nvidia/cu13/lib),
# and the driver's libcuda.
if [ "$DEVICE" != cpu ]; then
    CULIB=$(python3 -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13", "lib"))')
    export LD_LIBRARY_PATH=$CULIB:/usr/local/nvidia/lib64:${LD_LIBRARY_PATH:-}
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
    if ldd "$BIN/trainer" | grep 'not found'; then
        log "libraries missing (above); LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
        exit 1
    fi
    # GPU memory in use, every second, for the peak.
    nvidia-smi --query-gpu=timestamp,memory.used,utilization.gpu --format=csv,noheader -l 1 \
        >"$OUT/gpu_memory.csv" 2>/dev/null &
    SMI=$!
    trap 'kill $SMI 2>/dev/null || true' EXIT
fi

# A failing test does not stop the run (the fit's figures still come back); the script's
# status says it failed.
tests_rc=0
if [ "$TESTS" = 1 ]; then
    log "CUDA parity tests"
    MODA_TEST_FIXTURES=$PWD/tests/fixtures "$BIN/cuda-tests" --test-threads 1 --nocapture || tests_rc=$?
fi

log "synthetic catalog of $COUNT products"
"$BIN/trainer" synth --out "$WORK/catalog" --count "$COUNT" --seed 0

log "a tokenizer trained on the captions (one step of --preset tiny on $DEVICE)"
"$BIN/trainer" fit --data "$WORK/catalog" --preset tiny --max-steps 1 --quiet \
    --device "$DEVICE" --out "$WORK/tiny"

log "random real-size backbones"
small=()
[ "$SMALL" = 1 ] && small=(--small)
python3 scripts/random_backbones.py --out "$WORK/backbones" --tokenizer-from "$WORK/tiny/last" \
    "${small[@]}"

log "trainer fit --device $DEVICE, $EPOCHS epochs, the recipe's settings"
start=$(date +%s.%N)
"$BIN/trainer" fit --data "$WORK/catalog" --encoder "$WORK/backbones/clip" \
    --decoder "$WORK/backbones/opt" --device "$DEVICE" --epochs "$EPOCHS" \
    --cache-dir "$WORK/cache" --out "$WORK/run"
end=$(date +%s.%N)
cp "$WORK/run/metrics.jsonl" "$WORK/run/loss.png" "$OUT/"

log "trainer eval --device $DEVICE"
"$BIN/trainer" eval --checkpoint "$WORK/run/best" --data "$WORK/catalog" --device "$DEVICE" \
    --cache-dir "$WORK/cache" --predictions "$OUT/predictions.csv" --json >"$OUT/eval.json"

python3 - "$OUT" "$start" "$end" <<'EOF'
import json, sys
out, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
epochs = [json.loads(l) for l in open(f"{out}/metrics.jsonl") if '"kind":"epoch"' in l]
secs = [e["seconds"] for e in epochs]
print(f"fit wall time {end - start:.1f} s for {len(epochs)} epochs (embedding cache included)")
print("seconds per epoch:", " ".join(f"{s:.2f}" for s in secs))
print(f"first epoch {secs[0]:.2f} s, median {sorted(secs)[len(secs) // 2]:.2f} s")
print("validation loss:", " ".join(f"{e['val_loss']:.3f}" for e in epochs))
try:
    mem = [int(l.split(",")[1].split()[0]) for l in open(f"{out}/gpu_memory.csv") if "MiB" in l]
    print(f"peak GPU memory in use {max(mem)} MiB")
except (OSError, ValueError, IndexError):
    pass
ev = json.load(open(f"{out}/eval.json"))
acc = " ".join(f"{k} {v['accuracy']:.3f}" for k, v in ev["attributes"].items())
print(f"eval: {ev.get('samples', '?')} samples, exact match {ev['exact_match']:.3f}; {acc}")
EOF
if [ "$tests_rc" != 0 ]; then
    log "the CUDA tests failed (status $tests_rc): see above"
    exit 1
fi
log done
