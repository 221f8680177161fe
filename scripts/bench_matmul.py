#!/usr/bin/env python3
"""The matrix products of a real-size training step in PyTorch (developer-only), to set beside
`cargo run --release -p moda-models --example gemm_layouts`: `y = x w^T` with x [672, k]
(batch 32 of one image position and 20 tokens) and w [n, k] for OPT-125m's q/k/v/out, fc1,
fc2 and LM head, fp32 on the CPU, best of N runs each.

    python3 scripts/bench_matmul.py [reps]
"""
import sys
import time

import torch

reps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
rows = 32 * 21
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, rows {rows}, best of {reps}")
print(f"{'y = x w^T, w [n, k]':>24} {'ms':>10} {'GFLOP/s':>10}")
torch.manual_seed(0)
for n, k in [(768, 768), (3072, 768), (768, 3072), (50272, 768)]:
    x = torch.randn(rows, k)
    w = torch.randn(n, k)
    best = float("inf")
    for _ in range(reps + 1):  # the first run warms up
        t = time.perf_counter()
        x @ w.T
        best = min(best, time.perf_counter() - t)
    print(f"{f'n {n}, k {k}':>24} {best * 1e3:>10.2f} {2 * rows * n * k / best / 1e9:>10.0f}")
