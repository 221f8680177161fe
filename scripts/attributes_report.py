#!/usr/bin/env python3
"""Scores `moda-sdk describe --json` records against a catalog's true attributes.

    scripts/attributes_report.py RECORDS.jsonl [RECORDS.jsonl ...] --catalog fashion.csv
        [--json OUT.json]

For each records file (one run: a bundle kind, free or constrained decoding): exact match of
the description against the caption the catalog's values make, accuracy per attribute (the
record's `attributes`, read by the SDK's parser), the share of descriptions whose every field
holds a known value, the fields with no known value (free text outside the schema), decoder
runs per description, the median describe time, and the calibration of the confidences
(attributes bucketed by confidence, accuracy per bucket, and the expected calibration error:
the bucket-size-weighted mean of |accuracy - mean confidence|). Records are matched to catalog
rows by image file name (the Kaggle layout's `Image` column, else `<ProductId>.jpg`).
Standard library only.
"""

import argparse
import csv
import json
import os
import statistics
import sys

TEMPLATE = "{Colour} {Usage} {ProductType} for {Gender} - {Category} {SubCategory}"
FIELDS = ["Colour", "Usage", "ProductType", "Gender", "Category", "SubCategory"]
BUCKETS = [0.0, 0.5, 0.8, 0.9, 0.95, 0.99, 1.0000001]


def load_truth(path):
    truth = {}
    with open(path, newline="") as f:
        for row in csv.DictReader(f):
            name = row.get("Image") or f"{row['ProductId']}.jpg"
            truth[name] = row
    return truth


def score(path, truth):
    records = []
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if "moda_job" in r or "description" not in r:
                continue
            records.append(r)
    n = len(records)
    if n == 0:
        sys.exit(f"{path}: no description records")
    exact = parsed_all = 0
    missing = 0
    correct = {a: 0 for a in FIELDS}
    runs, totals = [], []
    conf_pairs = []  # (confidence, correct)
    unmatched = 0
    for r in records:
        t = truth.get(os.path.basename(r["image"]))
        if t is None:
            unmatched += 1
            continue
        target = TEMPLATE.format(**{a: t[a].strip() for a in FIELDS})
        exact += r["description"] == target
        attrs = r.get("attributes") or {}
        ok_all = True
        for a in FIELDS:
            v = attrs.get(a)
            if v is None:
                missing += 1
                ok_all = False
                continue
            hit = v["value"] == t[a].strip()
            correct[a] += hit
            if v.get("confidence") is not None:
                conf_pairs.append((v["confidence"], hit))
        parsed_all += ok_all
        timings = r.get("timings_ms", {})
        if "decoder_runs" in timings:
            runs.append(timings["decoder_runs"])
        if "total" in timings:
            totals.append(timings["total"])
    m = n - unmatched
    buckets = []
    ece = 0.0
    for lo, hi in zip(BUCKETS, BUCKETS[1:]):
        inside = [(c, h) for c, h in conf_pairs if lo <= c < hi]
        if not inside:
            continue
        acc = sum(h for _, h in inside) / len(inside)
        mean_c = sum(c for c, _ in inside) / len(inside)
        ece += len(inside) / len(conf_pairs) * abs(acc - mean_c)
        buckets.append({"from": lo, "to": min(hi, 1.0), "n": len(inside),
                        "mean_confidence": mean_c, "accuracy": acc})
    return {
        "file": path,
        "descriptions": m,
        "unmatched": unmatched,
        "exact_match": exact / m,
        "accuracy": {a: correct[a] / m for a in FIELDS},
        "all_fields_known": parsed_all / m,
        "fields_without_known_value": missing,
        "decoder_runs_mean": statistics.mean(runs) if runs else None,
        "tokens_mean": statistics.mean(r["timings_ms"].get("tokens", 0) for r in records),
        "describe_ms_median": statistics.median(totals) if totals else None,
        "calibration": buckets,
        "ece": ece,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("records", nargs="+")
    ap.add_argument("--catalog", required=True, help="the catalog CSV with the true values")
    ap.add_argument("--json", help="also write the scores here")
    a = ap.parse_args()
    truth = load_truth(a.catalog)
    results = [score(p, truth) for p in a.records]
    head = f"{'run':<28} {'exact':>6} {'parsed':>7} {'no-value':>8} {'runs':>5} {'tokens':>6} {'ms':>6} {'ECE':>6}  " + " ".join(f"{x[:8]:>8}" for x in FIELDS)
    print(head)
    for r in results:
        name = os.path.basename(r["file"])
        runs = f"{r['decoder_runs_mean']:.2f}" if r["decoder_runs_mean"] is not None else "-"
        ms = f"{r['describe_ms_median']:.1f}" if r["describe_ms_median"] is not None else "-"
        print(f"{name:<28} {100 * r['exact_match']:>5.1f}% {100 * r['all_fields_known']:>6.1f}% "
              f"{r['fields_without_known_value']:>8} {runs:>5} {r['tokens_mean']:>6.2f} {ms:>6} {r['ece']:>6.4f}  "
              + " ".join(f"{100 * r['accuracy'][x]:>7.1f}%" for x in FIELDS))
    print("\ncalibration (attributes by confidence: count, mean confidence -> accuracy)")
    for r in results:
        cells = "  ".join(f"[{b['from']:.2f},{b['to']:.2f}) {b['n']}: {b['mean_confidence']:.3f}->{b['accuracy']:.3f}"
                          for b in r["calibration"])
        print(f"  {os.path.basename(r['file'])}: {cells}")
    if a.json:
        with open(a.json + ".tmp", "w") as f:
            json.dump(results, f, indent=1)
        os.replace(a.json + ".tmp", a.json)


if __name__ == "__main__":
    main()
