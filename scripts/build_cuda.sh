#!/usr/bin/env bash
# Builds the CUDA `trainer` and the CUDA test binary (tests/tests/cuda.rs) on a machine with no
# GPU and no CUDA toolkit, for scripts/gpu_check.sh to run on a GPU machine that has no Rust.
#
#   bash scripts/build_cuda.sh      # -> .cuda-build/trainer.xz, .cuda-build/cuda-tests.xz
#
# It also packs CPU builds of the trainer and the bench_step and gemm_layouts examples into
# .cuda-build/cpu/, for scripts/cpu_anchors.sh on the GPU machine's host CPU (built first, in
# the workspace's usual target directory, before the CUDA environment is set).
#
# What it needs and why:
# - nvcc, the CUDA headers and the libraries candle links (cuBLAS, cuBLASLt, cuRAND, NVRTC,
#   cudart): NVIDIA's PyPI wheels, pinned to CUDA 13.0 (the device image's nvcc and driver
#   580 are 13.0; kernels built by a newer nvcc would carry PTX that driver cannot load).
#   They go into a virtual environment at $CUDA_VENV (default ~/.cache/moda/cuda-venv).
# - libcuda.so, the driver, which only a GPU machine has: candle's cudarc links it
#   (`dynamic-linking`), so a stub with the same symbols (generated from cudarc's bindings)
#   stands in for the link. The binaries load the real driver at run time.
# - CUDA_COMPUTE_CAP (default 90, Hopper): what candle's kernels are compiled for.
# The build goes to its own target directory ($CUDA_TARGET, default target-cuda), so the CPU
# build's artefacts stay as they are. It takes long: candle's CUDA kernels compile with nvcc.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
VENV=${CUDA_VENV:-$HOME/.cache/moda/cuda-venv}
TARGET=${CUDA_TARGET:-$ROOT/target-cuda}
OUTDIR=$ROOT/.cuda-build
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}

cargo build --release -p trainer --bin trainer --example bench_step
cargo build --release -p moda-models --example gemm_layouts
CPU_BIN=$(cargo metadata --format-version 1 --no-deps -q |
    python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])')/release

if [ ! -x "$VENV/bin/pip" ]; then
    python3 -m venv "$VENV"
fi
"$VENV/bin/pip" install -q \
    nvidia-cuda-nvcc==13.0.88 nvidia-nvvm==13.0.88 nvidia-cuda-crt==13.0.88 \
    nvidia-cuda-runtime==13.0.96 nvidia-cuda-cccl==13.0.85 nvidia-cuda-nvrtc==13.0.88 \
    nvidia-cublas==13.0.2.14 nvidia-curand==10.4.0.35
CUDA=$("$VENV/bin/python" -c 'import nvidia, os; print(os.path.join(list(nvidia.__path__)[0], "cu13"))')
# The linker looks for libNAME.so; the wheels ship only the versioned names.
for lib in cublas cublasLt cudart curand nvrtc; do
    so=$(cd "$CUDA/lib" && ls "lib$lib.so."* | grep -v alt | head -n 1)
    ln -sf "$so" "$CUDA/lib/lib$lib.so"
done

# The driver stub: every cu* function cudarc declares, as an empty function.
STUB=$VENV/driver-stub
mkdir -p "$STUB"
cargo fetch -q
CUDARC=$(cargo metadata --format-version 1 --features trainer/cuda -q |
    python3 -c 'import json, sys; print(next(p["manifest_path"] for p in json.load(sys.stdin)["packages"] if p["name"] == "cudarc"))')
grep -oE '^\s+fn cu[A-Za-z0-9_]+\(' "$(dirname "$CUDARC")/src/driver/sys/mod.rs" |
    sed -E 's/.*fn (cu[A-Za-z0-9_]+)\(/void \1(void) {}/' | sort -u >"$STUB/stub.c"
gcc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$STUB/libcuda.so" "$STUB/stub.c"

export CUDA_HOME=$CUDA CUDA_PATH=$CUDA PATH=$CUDA/bin:$PATH CUDARC_CUDA_VERSION=13000
# The linker (cc) finds -lcuda and the others through LIBRARY_PATH.
export LIBRARY_PATH=$CUDA/lib:$STUB
export CARGO_TARGET_DIR=$TARGET
cargo build --release -p trainer --features cuda --bin trainer
tests=$(cargo test --release -p moda-tests --features cuda --test cuda --no-run \
    --message-format json 2>/dev/null |
    python3 -c 'import json, sys
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "cuda" and m.get("executable"):
        print(m["executable"])')
# Stripped, each is about 70 MB (candle's CUDA kernels are in it), over what the device tool
# carries (64 MiB in all); xz makes them about 10 MB.
rm -rf "$OUTDIR"
mkdir -p "$OUTDIR"
strip -o "$OUTDIR/trainer" "$TARGET/release/trainer"
strip -o "$OUTDIR/cuda-tests" "$tests"
xz -T0 "$OUTDIR/trainer" "$OUTDIR/cuda-tests"
mkdir -p "$OUTDIR/cpu"
strip -o "$OUTDIR/cpu/trainer" "$CPU_BIN/trainer"
strip -o "$OUTDIR/cpu/bench_step" "$CPU_BIN/examples/bench_step"
strip -o "$OUTDIR/cpu/gemm_layouts" "$CPU_BIN/examples/gemm_layouts"
xz -T0 "$OUTDIR"/cpu/*
ls -la "$OUTDIR" "$OUTDIR/cpu"
