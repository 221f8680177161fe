#!/usr/bin/env bash
# The speed figures a new kind of machine needs, in one run (developer-only; not in CI): the
# CPU (`lscpu`), then
#   1. describe against PyTorch: scripts/bench_sdk.py --cold 3 (real-size random weights; fp32,
#      int8 and int4 bundles with a tokenizer of OPT's size (scripts/train_bpe.py) and the demo
#      catalog's caption schema; warm figures, decode steps against their memory floor, cold
#      processes), then batch throughput at batch 1, 4, 8 and 16, a catalog job's time per
#      image beside bench's describe, and the int8 and int4 decode steps beside a hand-written
#      kernel's time for their products alone (the quant_products example);
#   2. the real-size training step: trainer's bench_step example against scripts/bench_step.py,
#      three alternated rounds of five steps, medians (scripts/alternate_steps.py);
#      then its matrix products alone: the gemm_layouts example against scripts/bench_matmul.py
#      (gemm, candle's CPU matmul, against PyTorch's, per shape);
#   3. the tiny preset's epochs on the demo catalog (`trainer fit --preset tiny --epochs 4`):
#      seconds per epoch and the share of the cores busy, from metrics.jsonl.
# Each part's full output goes to OUT/; the summary to stdout. Needs a Python with torch,
# transformers, pillow, numpy and safetensors (PYTHON, default /work/pyenv/bin/python) and
# the demo catalog (`make demo` writes demo/catalog). About 11 minutes on 2 cores, 4 GB of disk.
#
#   scripts/machine_report.sh OUT
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:?usage: scripts/machine_report.sh OUT}"
py="${PYTHON:-/work/pyenv/bin/python}"
cd "$root"
mkdir -p "$out"
"$py" -c "import torch, transformers, PIL, numpy, safetensors" || {
  echo "machine_report.sh: $py lacks torch, transformers, pillow, numpy or safetensors" >&2
  exit 2
}
[ -f demo/catalog/fashion.csv ] || {
  echo "machine_report.sh: no demo/catalog/fashion.csv (run make demo first)" >&2
  exit 2
}
cargo build --release -p exporter -p moda-cli -p trainer >&2
cargo build --release -p trainer --example bench_step >&2
cargo build --release -p moda-models --example gemm_layouts >&2
cargo build --release -p moda-sdk --example quant_products >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release"

lscpu | tee "$out/lscpu.txt" | grep -E "^(Model name|CPU\(s\)|Flags)" | cut -c1-200
echo

echo "== 1. describe against PyTorch (scripts/bench_sdk.py --cold 3)"
[ -d "$out/full" ] || "$py" scripts/make_fixtures.py --full-size "$out/full" > "$out/fixtures.log" 2>&1
[ -f "$out/bpe50k.json" ] || "$py" scripts/train_bpe.py "$out/bpe50k.json" > "$out/bpe.log"
"$py" scripts/bench_sdk.py --full-size "$out/full" --work "$out/sdk" --cold 3 \
  --tokenizer "$out/bpe50k.json" --catalog demo/catalog/fashion.csv > "$out/bench_sdk.log"
sed -n '/^one image/,$p' "$out/bench_sdk.log"
"$py" - "$out/sdk/bench.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
for name, runs in r["sdk"].items():
    l = runs[max(runs, key=int)]
    print(f"{name:>6} decode step {l['early_step']}: {l['token_ms_early']:.2f} ms, floor "
          f"{l['floor_ms_early']:.2f} ms ({l['read_gb_per_s']:.1f} GB/s): "
          f"{l['token_ms_early'] / l['floor_ms_early']:.2f}x")
PY
echo
echo "-- batch throughput (moda-sdk bench --max-new-tokens 10 --reps 3 --batch-size N), images/s"
for kind in fp32 int8 int4; do
  line="$kind:"
  for n in 1 4 8 16; do
    ips=$("$bin/moda-sdk" bench --model "$out/sdk/bundle-$kind" tests/fixtures/images/photo.jpg \
      --max-new-tokens 10 --reps 3 --batch-size "$n" 2>&1 | sed -n 's/.*batch of.*(\([0-9.]*\) images\/s).*/\1/p')
    line="$line batch $n ${ips:-?}"
  done
  echo "$line"
done | tee "$out/batches.txt"
echo "-- a catalog job's time per image against bench's describe (24 tokens, batch 1, free decoding;"
echo "   median of the records' timings_ms.total over images 2-9 of 9 copies; 2 alternated rounds)"
mkdir -p "$out/job"
for i in 1 2 3 4 5 6 7 8 9; do cp tests/fixtures/images/photo.jpg "$out/job/p$i.jpg"; done
for round in 1 2; do
  for kind in fp32 int4; do
    job=$("$bin/moda-sdk" describe --model "$out/sdk/bundle-$kind" --json --constrain none \
      --min-new-tokens 24 --max-new-tokens 24 --batch-size 1 "$out"/job/p*.jpg 2>/dev/null | "$py" -c '
import json, statistics, sys
t = [json.loads(l)["timings_ms"]["total"] for l in sys.stdin]
print(f"{statistics.median(t[1:]):.1f} ms")')
    bench=$("$bin/moda-sdk" bench --model "$out/sdk/bundle-$kind" tests/fixtures/images/photo.jpg \
      --max-new-tokens 24 --reps 5 --batch-size 1 2>&1 | sed -n 's/^ *describe *\([0-9.]* ms\).*/\1/p')
    echo "round $round $kind: job $job per image, bench describe $bench"
  done
done | tee "$out/job.txt"
echo "-- the quantized decode steps against a hand-written kernel for their products alone"
echo "   (the quant_products example; 2 alternated rounds with bench's step 5)"
for round in 1 2; do
  for kind in int8 int4; do
    step=$("$bin/moda-sdk" bench --model "$out/sdk/bundle-$kind" tests/fixtures/images/photo.jpg \
      --max-new-tokens 64 --reps 5 --batch-size 1 2>&1 | sed -n 's/^ *decode step 5 *//p')
    flag=""; [ "$kind" = int8 ] && flag="--int8"
    own=$("$bin/examples/quant_products" ${flag:+"$flag"} 2>&1 | tee -a "$out/quant_products.log" | sed -n "s/^[0-9]* products, //p")
    echo "round $round $kind: ONNX Runtime's step $step"
    echo "round $round $kind: hand kernel's products ${own:-not run, see $out/quant_products.log}"
  done
done | tee "$out/products.txt"
echo

echo "== 2. real-size training step (bench_step against scripts/bench_step.py, 3 alternated rounds of 5 steps)"
"$py" scripts/alternate_steps.py 3 5 candle="$bin/examples/bench_step" \
  torch="$py scripts/bench_step.py" | tee "$out/bench_step.txt"
for round in 1 2; do
  "$bin/examples/gemm_layouts" 5
  "$py" scripts/bench_matmul.py 5
done | tee "$out/matmul.txt"
echo

echo "== 3. tiny preset on the demo catalog (trainer fit --preset tiny --epochs 4)"
rm -rf "$out/fit"
"$bin/trainer" fit --data demo/catalog --preset tiny --epochs 4 --out "$out/fit" --quiet > "$out/fit.log" 2>&1
"$py" - "$out/fit/metrics.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    e = json.loads(line)
    if e.get("kind") == "epoch":
        p = e["profile"]
        print(f"epoch {e['epoch']}: {e['seconds']:.2f} s (micro-batches {p['micro_batches_s']:.2f} s, "
              f"optimizer {p['optimizer_s']:.2f} s, validation {p['validation_s']:.2f} s), "
              f"cores busy {p['cpu_busy']:.2f}, steal {p['cpu_steal']:.2f}")
PY
