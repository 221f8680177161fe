#!/usr/bin/env python3
"""One training step of the real-size model in PyTorch (developer-only), to compare with
`cargo run --release -p trainer --example bench_step`: OPT-125m (random weights) + the recipe's
projector, batch 32, 20 text tokens, image embeddings given (cached encoder), forward + backward
+ clip_grad_norm_ + AdamW, CPU, eval mode (no dropout, as the Rust example).

    /work/pyenv/bin/python scripts/bench_step.py [steps]
"""
import sys
import time

import torch
import torch.nn as nn
from transformers import OPTConfig, OPTForCausalLM

steps = int(sys.argv[1]) if len(sys.argv) > 1 else 5
torch.manual_seed(0)
cfg = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=int(__import__("os").environ.get("BENCH_LAYERS", 12)), ffn_dim=3072, num_attention_heads=12,
                max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True, dropout=0.1)
opt = OPTForCausalLM(cfg).eval()
proj = nn.Sequential(nn.Linear(512, 3072), nn.GELU(), nn.Linear(3072, 768))
params = list(opt.parameters()) + list(proj.parameters())
optim = torch.optim.AdamW(params, lr=1e-3)
b, t = 32, 20
embeds = torch.randn(b, 512)
ids = torch.randint(4, 50000, (b, t))
labels = torch.cat([torch.full((b, 1), -100), ids], 1)
am = torch.ones(b, t + 1, dtype=torch.long)
print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, "
      f"parameters {sum(p.numel() for p in params)}")
times = []
for i in range(steps + 1):
    t0 = time.perf_counter()
    optim.zero_grad()
    x = torch.cat([proj(embeds).unsqueeze(1), opt.get_input_embeddings()(ids)], 1)
    loss = opt(inputs_embeds=x, attention_mask=am, labels=labels).loss
    t_fwd = time.perf_counter() - t0
    loss.backward()
    t_bwd = time.perf_counter() - t0
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optim.step()
    dt = time.perf_counter() - t0
    print(f"step {i}: loss {loss.item():.4f}, {dt:.3f}s (forward {t_fwd:.3f}s, backward {t_bwd - t_fwd:.3f}s, "
          f"clip + AdamW {dt - t_bwd:.3f}s)")
    if i > 0:
        times.append(dt)
times.sort()
print(f"pytorch median step: {times[len(times) // 2]:.3f}s")
