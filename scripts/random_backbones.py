#!/usr/bin/env python3
"""Writes randomly initialised backbones of the real architecture, as Hugging Face directories.

Developer-only, for benchmarks on machines with no model hub (the GPU check in
scripts/gpu_check.sh): `transformers` builds CLIP ViT-B/32 (FashionCLIP's vision tower, with
its 512-wide projection) and OPT-125m from their default configurations, with random weights,
and `save_pretrained` writes them. The decoder directory gets the tokenizer of another
directory (for example a `trainer fit --preset tiny` checkpoint, whose byte-level BPE was
trained on the catalog's captions and uses OPT's special-token ids), since OPT's own vocabulary
cannot be downloaded there.

    python3 scripts/random_backbones.py --out DIR --tokenizer-from CHECKPOINT [--small]

writes DIR/clip and DIR/opt. `--small` shrinks both (same code path, for a dry run on a CPU).
"""

import argparse
import os
import shutil

import torch
from transformers import (
    CLIPImageProcessor,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    OPTConfig,
    OPTForCausalLM,
)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", required=True)
    ap.add_argument("--tokenizer-from", required=True, help="a directory with tokenizer.json")
    ap.add_argument("--small", action="store_true", help="small sizes, for a dry run")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    torch.manual_seed(args.seed)

    tok = os.path.join(args.tokenizer_from, "tokenizer.json")
    if not os.path.isfile(tok):
        raise SystemExit(f"{tok}: no such file")

    # CLIP ViT-B/32: transformers' CLIPVisionConfig defaults (768 wide, 12 layers, 12 heads,
    # patch 32, 224 px, quick_gelu) plus FashionCLIP's 512-wide projection.
    vcfg = CLIPVisionConfig(projection_dim=512)
    if args.small:
        vcfg = CLIPVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            image_size=64,
            patch_size=16,
            projection_dim=32,
        )
    clip = CLIPVisionModelWithProjection(vcfg).eval()
    clip_dir = os.path.join(args.out, "clip")
    clip.save_pretrained(clip_dir)
    side = vcfg.image_size
    CLIPImageProcessor(
        size={"shortest_edge": side}, crop_size={"height": side, "width": side}
    ).save_pretrained(clip_dir)

    # OPT-125m: OPTConfig's defaults are its shape (vocabulary 50272, 768 wide, 12 layers,
    # 12 heads, FFN 3072, 2048 positions, pre-LN, ReLU, dropout 0.1, tied head).
    ocfg = OPTConfig(pad_token_id=1, bos_token_id=2, eos_token_id=2)
    if args.small:
        ocfg = OPTConfig(
            vocab_size=1024,
            hidden_size=64,
            num_hidden_layers=2,
            ffn_dim=128,
            num_attention_heads=4,
            max_position_embeddings=128,
            word_embed_proj_dim=64,
            pad_token_id=1,
            bos_token_id=2,
            eos_token_id=2,
        )
    opt = OPTForCausalLM(ocfg).eval()
    opt_dir = os.path.join(args.out, "opt")
    opt.save_pretrained(opt_dir)
    shutil.copyfile(tok, os.path.join(opt_dir, "tokenizer.json"))

    n_clip = sum(p.numel() for p in clip.parameters())
    n_opt = sum(p.numel() for p in opt.parameters())
    print(f"wrote {clip_dir} ({n_clip / 1e6:.1f} M parameters) and {opt_dir} ({n_opt / 1e6:.1f} M)")


if __name__ == "__main__":
    main()
