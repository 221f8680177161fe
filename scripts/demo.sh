#!/usr/bin/env bash
# The demo: a synthetic catalog -> `trainer fit --preset tiny` on the CPU -> `trainer eval` on the
# held-out 20% -> `exporter onnx`. Everything lands in demo/ (git-ignored); a second run reuses
# what is already there (delete demo/ to start over). `moda-sdk describe` joins when the SDK
# CLI exists (issue 5).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
out="$root/demo"
mkdir -p "$out"

step() { printf '\n== %s\n' "$*"; }

step "build (release)"
cargo build --release -p trainer -p exporter
bin="${CARGO_TARGET_DIR:-$root/target}/release"

if [ ! -f "$out/catalog/fashion.csv" ]; then
  step "synthetic catalog: 1500 products -> demo/catalog"
  "$bin/trainer" synth --out "$out/catalog" --count 1500 --seed 0
else
  step "synthetic catalog: reusing demo/catalog"
fi

if [ ! -f "$out/run/best/config.json" ]; then
  step "train: trainer fit --preset tiny -> demo/run (loss plot: demo/run/loss.png)"
  "$bin/trainer" fit --data "$out/catalog" --preset tiny --out "$out/run"
else
  step "train: reusing demo/run/best"
fi

step "evaluate the held-out 20%: trainer eval"
"$bin/trainer" eval --checkpoint "$out/run/best" --data "$out/catalog" \
  --predictions "$out/predictions.csv"
echo
echo "A few held-out products (true caption | MODA's description):"
python3 - "$out/predictions.csv" <<'PY'
import csv, sys
for r in list(csv.DictReader(open(sys.argv[1], newline="")))[:8]:
    mark = "=" if r["exact"] in ("1", "true", "True") else "x"
    print(f"  {mark} {r['target']:<58} | {r['prediction']}")
PY

if [ ! -f "$out/bundle/moda.json" ]; then
  step "export: exporter onnx -> demo/bundle"
  "$bin/exporter" onnx --checkpoint "$out/run/best" --out "$out/bundle"
else
  step "export: reusing demo/bundle"
fi
ls -la "$out/bundle"
step "done: demo/run/loss.png, demo/run/metrics.jsonl, demo/predictions.csv, demo/bundle/"
