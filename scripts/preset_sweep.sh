#!/usr/bin/env bash
# The tiny preset over synthetic catalogs of several seeds: for each seed, `trainer synth`
# (COUNT products), `trainer fit --preset tiny` (timed), `trainer eval` of the held-out split
# (free decoding, as the preset was tuned, and constrained to the checkpoint's schema), then a
# table of exact match and per-attribute accuracy per seed, with the mean and the worst, and
# the CPU it ran on, and the commonest errors over all the seeds. Tune on some seeds, judge on
# others.
#
#   scripts/preset_sweep.sh [--count N] [--out DIR] [--] SEED [SEED ...]
#
# Defaults: --count 1500 --out sweep/ (git-ignored). A seed already done in DIR is reused (delete
# its folder to redo it). Extra `trainer fit` flags go in FIT_ARGS (e.g. FIT_ARGS="--epochs 150").
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
count=1500
out="$root/sweep"
seeds=()
while [ $# -gt 0 ]; do
  case "$1" in
    --count) count="$2"; shift 2 ;;
    --out) out="$2"; shift 2 ;;
    --) shift; seeds+=("$@"); break ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    -*) echo "preset_sweep.sh: unknown option $1" >&2; exit 2 ;;
    *) seeds+=("$1"); shift ;;
  esac
done
if [ ${#seeds[@]} -eq 0 ]; then
  echo "preset_sweep.sh: give at least one seed (see --help)" >&2
  exit 2
fi
cd "$root"
cargo build --release -p trainer >&2
bin="${CARGO_TARGET_DIR:-$root/target}/release"
mkdir -p "$out"
for s in "${seeds[@]}"; do
  d="$out/seed-$s"
  mkdir -p "$d"
  if [ ! -f "$d/catalog/fashion.csv" ]; then
    "$bin/trainer" synth --out "$d/catalog" --count "$count" --seed "$s" >&2
  fi
  if [ ! -f "$d/fit_seconds" ]; then
    start=$(date +%s)
    # shellcheck disable=SC2086
    "$bin/trainer" fit --data "$d/catalog" --preset tiny --out "$d/run" --quiet ${FIT_ARGS:-} >&2
    echo $(( $(date +%s) - start )) > "$d/fit_seconds"
  fi
  for c in none schema; do
    if [ ! -f "$d/eval-$c.json" ]; then
      "$bin/trainer" eval --checkpoint "$d/run/best" --data "$d/catalog" --constrain "$c" \
        --predictions "$d/predictions-$c.csv" --json --quiet > "$d/eval-$c.json.tmp"
      mv "$d/eval-$c.json.tmp" "$d/eval-$c.json"
    fi
  done
done
cpu="$(lscpu | sed -n 's/^Model name: *//p' | head -1)"
python3 - "$out" "$cpu" "${seeds[@]}" <<'PY'
import json, sys
out, cpu, seeds = sys.argv[1], sys.argv[2], sys.argv[3:]
attrs = ["Colour", "Usage", "ProductType", "Gender", "Category", "SubCategory"]
print(f"tiny preset on {len(seeds)} seeds ({cpu}, {__import__('os').cpu_count()} CPUs)")
for mode in ["none", "schema"]:
    print(f"\ndecoding: {'free' if mode == 'none' else 'constrained to the schema'}")
    print(f"{'seed':>6} {'fit s':>7} {'exact':>7} " + " ".join(f"{a[:11]:>11}" for a in attrs))
    rows = []
    for s in seeds:
        r = json.load(open(f"{out}/seed-{s}/eval-{mode}.json"))
        fit = float(open(f"{out}/seed-{s}/fit_seconds").read())
        acc = [100 * r["attributes"][a]["accuracy"] for a in attrs]
        rows.append((fit, 100 * r["exact_match"], acc))
        print(f"{s:>6} {fit:>7.0f} {100 * r['exact_match']:>6.1f}% " + " ".join(f"{x:>10.1f}%" for x in acc))
    n = len(rows)
    mean = [sum(r[2][i] for r in rows) / n for i in range(len(attrs))]
    worst = [min(r[2][i] for r in rows) for i in range(len(attrs))]
    print(f"{'mean':>6} {sum(r[0] for r in rows) / n:>7.0f} {sum(r[1] for r in rows) / n:>6.1f}% " + " ".join(f"{x:>10.1f}%" for x in mean))
    print(f"{'worst':>6} {max(r[0] for r in rows):>7.0f} {min(r[1] for r in rows):>6.1f}% " + " ".join(f"{x:>10.1f}%" for x in worst))

# Where the free-decoding errors were, over all the seeds: the commonest confusions of Usage
# (with the product type) and of ProductType, and the product types whose Usage is wrong most
# often (wrong / held out), and the colours whose ProductType is wrong most often (a fill as
# light as the backdrop leaves the shape an outline).
import collections, csv
usage, ptype = collections.Counter(), collections.Counter()
held, usage_wrong = collections.Counter(), collections.Counter()
held_colour, ptype_wrong = collections.Counter(), collections.Counter()
for s in seeds:
    truth = {r["ProductId"]: r for r in csv.DictReader(open(f"{out}/seed-{s}/catalog/fashion.csv"))}
    for p in csv.DictReader(open(f"{out}/seed-{s}/predictions-none.csv")):
        t = truth[p["id"]]
        held[t["ProductType"]] += 1
        held_colour[t["Colour"]] += 1
        if p["pred_Usage"] != t["Usage"]:
            usage[f"{t['ProductType']}: {t['Usage']} -> {p['pred_Usage']}"] += 1
            usage_wrong[t["ProductType"]] += 1
        if p["pred_ProductType"] != t["ProductType"]:
            ptype[f"{t['ProductType']} -> {p['pred_ProductType']}"] += 1
            ptype_wrong[t["Colour"]] += 1
print(f"\nerrors over {sum(held.values())} held-out products (free decoding)")
print("  Usage:       " + "; ".join(f"{k} {v}" for k, v in usage.most_common(6)))
print("  ProductType: " + "; ".join(f"{k} {v}" for k, v in ptype.most_common(6)))
rate = sorted(usage_wrong, key=lambda k: -usage_wrong[k] / held[k])[:4]
print("  Usage wrong by type: " + "; ".join(f"{k} {usage_wrong[k]}/{held[k]}" for k in rate))
rate = sorted(ptype_wrong, key=lambda k: -ptype_wrong[k] / held_colour[k])[:4]
print("  ProductType wrong by colour: " + "; ".join(f"{k} {ptype_wrong[k]}/{held_colour[k]}" for k in rate))
PY
