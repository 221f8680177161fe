#!/usr/bin/env python3
"""MODA describe: the Rust SDK (ONNX Runtime) against the original PyTorch + transformers model
on the same real-size random weights, side by side in one run (developer-only; not in CI).

    /work/pyenv/bin/python scripts/make_fixtures.py --full-size FULL      # backbones, once
    /work/pyenv/bin/python scripts/bench_sdk.py --full-size FULL --work W   # prepare + measure

`prepare` (run first, automatically, when W has no bundles): a FashionOPT `state_dict` (the
original recipe's `.pth`: `opt.*`, `embed_tokens.weight`, `projection.*`) from FULL/opt-125m with
a seeded projector (nn.Linear's default init), then `exporter onnx` writes W/bundle-fp32,
W/bundle-int8 and W/bundle-int4 from it with FULL/clip-vit-b32 as the encoder. The tokenizer is
the fixture one (tests/fixtures/tokenizer, 597 tokens), or `--tokenizer FILE` (a tokenizer.json,
e.g. one of OPT's 50,265 tokens from scripts/train_bpe.py): the steps' times depend only on the
ids, but a cold process loads the tokenizer, and its load grows with the vocabulary.
`--catalog CSV` gives the bundles the caption schema of that catalog (`exporter onnx --catalog`),
as a trained bundle has: opening one also compiles the schema for the tokenizer.

`measure`: for each bundle, `moda-sdk bench --json` (one image, N tokens, greedy, forced length);
then PyTorch in a fresh process: CLIPImageProcessor (Pillow) + CLIPVisionModelWithProjection +
projector + OPTForCausalLM with a DynamicCache, greedy, the same N tokens, timing each decode
step; peak RSS of each process. Prints a table and writes W/bench.json.

`--cold R` adds R alternated rounds of cold processes: `moda-sdk describe` of the image with
exactly N tokens (`--min-new-tokens N`: random weights may write `</s>` at once) for each bundle, and a fresh Python process that imports torch and transformers, loads
the same weights and describes the image the same way; the wall time from process start to the
description's exit and the process's peak RSS (GNU time). Page cache warm (one untimed run of
each first), as for a user's second command.

Machine threads: both sides use every core the process may use (torch's default; the SDK's
default intra-op threads).
"""
import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def prepare(full: Path, work: Path, exporter: str, tokenizer=None, catalog=None):
    import torch
    import torch.nn as nn
    from transformers import OPTForCausalLM

    work.mkdir(parents=True, exist_ok=True)
    dec = work / "opt-125m"
    dec.mkdir(exist_ok=True)
    for f in (full / "opt-125m").iterdir():
        t = dec / f.name
        if not t.exists():
            os.symlink(f.resolve(), t)
    if tokenizer is None:
        for f in (ROOT / "tests/fixtures/tokenizer").iterdir():
            if f.suffix in (".json", ".txt") and f.name != "tokenizer_cases.json":
                shutil.copy(f, dec / f.name)
    else:
        for name in ("tokenizer.json", "vocab.json", "merges.txt", "special_tokens_map.json",
                     "tokenizer_config.json"):
            if (dec / name).is_symlink() or (dec / name).exists():
                (dec / name).unlink()
        shutil.copy(tokenizer, dec / "tokenizer.json")
    pth = work / "fashion_opt.pth"
    if not pth.exists():
        torch.manual_seed(0)
        opt = OPTForCausalLM.from_pretrained(full / "opt-125m", dtype=torch.float32)
        clip_cfg = json.loads((full / "clip-vit-b32/config.json").read_text())
        proj_dim = clip_cfg.get("projection_dim", 512)
        h = opt.config.word_embed_proj_dim
        projection = nn.Sequential(nn.Linear(proj_dim, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
        sd = {f"opt.{k}": v for k, v in opt.state_dict().items()}
        sd["embed_tokens.weight"] = opt.get_input_embeddings().weight
        sd.update({f"projection.{k}": v for k, v in projection.state_dict().items()})
        torch.save(sd, pth)
    for q in ("none", "int8", "int4"):
        out = work / f"bundle-{'fp32' if q == 'none' else q}"
        if (out / "moda.json").exists():
            continue
        cmd = [exporter, "onnx", "--checkpoint", str(pth), "--encoder", str(full / "clip-vit-b32"),
               "--decoder", str(dec), "--out", str(out), "--quantize", q, "--force"]
        if catalog is not None:
            cmd += ["--catalog", str(catalog)]
        print("+", " ".join(cmd), flush=True)
        subprocess.run(cmd, check=True)


# The original model in PyTorch, loaded from FULL and the recipe's state_dict: the start of both
# child programs below (arguments: FULL, the .pth, the image, the token count, then their own).
PYTORCH_LOAD = r"""
import json, resource, sys, time
import torch, torch.nn as nn
from PIL import Image
from transformers import CLIPImageProcessorPil, CLIPVisionModelWithProjection, OPTForCausalLM, DynamicCache
full, pth, image, tokens = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
torch.manual_seed(0)
proc = CLIPImageProcessorPil.from_pretrained(full + "/clip-vit-b32")
clip = CLIPVisionModelWithProjection.from_pretrained(full + "/clip-vit-b32", dtype=torch.float32).eval()
opt = OPTForCausalLM.from_pretrained(full + "/opt-125m", dtype=torch.float32).eval()
sd = torch.load(pth, weights_only=True)
h = opt.config.word_embed_proj_dim
projection = nn.Sequential(nn.Linear(clip.config.projection_dim, 4 * h), nn.GELU(), nn.Linear(4 * h, h))
projection.load_state_dict({k[len("projection."):]: v for k, v in sd.items() if k.startswith("projection.")})
opt.load_state_dict({k[len("opt."):]: v for k, v in sd.items() if k.startswith("opt.")}, strict=False)
emb = opt.get_input_embeddings()
"""

# Warm timings: one warm-up description, then `reps` timed ones (each stage and decode step).
PYTORCH_CHILD = PYTORCH_LOAD + r"""
reps = int(sys.argv[5])

def describe():
    t = {}
    t0 = time.perf_counter()
    px = proc(images=Image.open(image), return_tensors="pt")["pixel_values"]
    t["preprocess"] = time.perf_counter() - t0
    with torch.inference_mode():
        t1 = time.perf_counter()
        e = clip(pixel_values=px).image_embeds
        t["encoder"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        prefix = projection(e).unsqueeze(1)
        t["projector"] = time.perf_counter() - t1
        t1 = time.perf_counter()
        x = torch.cat([prefix, emb(torch.tensor([[2]]))], 1)
        cache = DynamicCache()
        mask = torch.ones(1, 2, dtype=torch.long)
        out = opt(inputs_embeds=x, attention_mask=mask, past_key_values=cache, use_cache=True)
        t["prefill"] = time.perf_counter() - t1
        steps = []
        ids = []
        logits = out.logits[:, -1]
        for i in range(tokens):
            tok = int(logits.argmax(-1))
            ids.append(tok)
            if i + 1 == tokens:
                break
            t1 = time.perf_counter()
            mask = torch.ones(1, mask.shape[1] + 1, dtype=torch.long)
            out = opt(inputs_embeds=emb(torch.tensor([[tok]])), attention_mask=mask,
                      past_key_values=out.past_key_values, use_cache=True)
            logits = out.logits[:, -1]
            steps.append(time.perf_counter() - t1)
    t["total"] = time.perf_counter() - t0
    return t, steps, ids

describe()
runs = [describe() for _ in range(reps)]
def med(xs):
    xs = sorted(xs); return xs[len(xs) // 2]
res = {k: med([r[0][k] for r in runs]) * 1e3 for k in runs[0][0]}
steps = [[s * 1e3 for s in r[1]] for r in runs]
res["step_ms"] = [med([s[i] for s in steps]) for i in range(len(steps[0]))]
res["tokens"] = len(runs[0][2])
res["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
res["torch"] = torch.__version__
res["threads"] = torch.get_num_threads()
print(json.dumps(res))
"""


# A cold PyTorch process: imports, loading and one description of `tokens` greedy tokens, as
# `moda-sdk describe IMAGE --max-new-tokens N` does (min = max, so the length is the same).
PYTORCH_COLD = PYTORCH_LOAD + r"""
with torch.inference_mode():
    px = proc(images=Image.open(image), return_tensors="pt")["pixel_values"]
    prefix = projection(clip(pixel_values=px).image_embeds).unsqueeze(1)
    x = torch.cat([prefix, emb(torch.tensor([[2]]))], 1)
    out = opt.generate(inputs_embeds=x, attention_mask=torch.ones(1, 2, dtype=torch.long),
                       max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False, num_beams=1)
print(out.shape[-1])
"""


def timed(cmd):
    """Wall seconds and peak RSS (MB) of one process running `cmd`, by GNU time (`/usr/bin/time`;
    Debian's `time` package): the rusage that Python's own `wait4` gets would also count the
    forked interpreter's pages before the child's exec."""
    p = subprocess.run(["/usr/bin/time", "-f", "%e %M"] + cmd, stdout=subprocess.DEVNULL,
                       stderr=subprocess.PIPE, text=True)
    if p.returncode != 0:
        raise SystemExit(f"{cmd[0]} failed ({p.returncode}): {p.stderr}")
    wall, kb = p.stderr.strip().splitlines()[-1].split()
    return float(wall), float(kb) / 1024


def cold(args, sdk, rounds):
    """Cold processes, alternated over the bundles and PyTorch; lists of (s, MB) per name."""
    cmds = {name: [sdk, "describe", "--model", str(args.work / f"bundle-{name}"), str(args.image),
                   "--max-new-tokens", str(args.tokens), "--min-new-tokens", str(args.tokens),
                   "--constrain", "none"]
            for name in ("fp32", "int8", "int4")}
    cmds["pytorch"] = [sys.executable, "-c", PYTORCH_COLD, str(args.full_size),
                       str(args.work / "fashion_opt.pth"), str(args.image), str(args.tokens)]
    for cmd in cmds.values():
        timed(cmd)  # page cache
    res = {name: [] for name in cmds}
    for _ in range(rounds):
        for name, cmd in cmds.items():
            res[name].append(timed(cmd))
    return res


def per_token(steps, pos):
    """Median-ish time of the decode steps around generated position `pos` (1-based)."""
    i = max(0, min(len(steps) - 1, pos - 1))
    window = steps[max(0, i - 2): i + 3]
    return sum(window) / len(window)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", required=True, type=Path)
    ap.add_argument("--work", required=True, type=Path)
    ap.add_argument("--image", type=Path, default=ROOT / "tests/fixtures/images/photo.jpg")
    ap.add_argument("--tokens", type=int, default=24)
    ap.add_argument("--tokenizer", type=Path, help="a tokenizer.json for the bundles (see above)")
    ap.add_argument("--catalog", type=Path,
                    help="a catalog CSV that gives the bundles a caption schema (see above)")
    ap.add_argument("--long-tokens", type=int, default=64, help="for the per-token time at position 60")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--bin", default=str(ROOT / "target/release"), help="where exporter and moda-sdk are")
    ap.add_argument("--cold", type=int, default=0, metavar="R",
                    help="also R alternated rounds of cold processes (see above)")
    args = ap.parse_args()
    exporter = str(Path(args.bin) / "exporter")
    sdk = str(Path(args.bin) / "moda-sdk")
    prepare(args.full_size, args.work, exporter, args.tokenizer, args.catalog)

    rows = {}
    for name in ("fp32", "int8", "int4"):
        bundle = args.work / f"bundle-{name}"
        r = {}
        for n in (args.tokens, args.long_tokens):
            cmd = [sdk, "bench", "--model", str(bundle), str(args.image), "--max-new-tokens", str(n),
                   "--reps", str(args.reps), "--batch-size", "4", "--json"]
            print("+", " ".join(cmd), flush=True)
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            r[n] = json.loads(out.strip().splitlines()[-1])
        rows[name] = r
    cmd = [sys.executable, "-c", PYTORCH_CHILD, str(args.full_size), str(args.work / "fashion_opt.pth"),
           str(args.image), str(args.long_tokens), str(args.reps)]
    print("+ pytorch", flush=True)
    pt_long = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    cmd[-2] = str(args.tokens)
    pt = json.loads(subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.splitlines()[-1])
    result = {"sdk": rows, "pytorch": {"short": pt, "long": pt_long},
              "machine": os.uname().machine, "cpus": os.cpu_count()}
    if args.cold:
        print("+ cold processes", flush=True)
        result["cold"] = cold(args, sdk, args.cold)
    (args.work / "bench.json").write_text(json.dumps(result, indent=1))

    print(f"\none image, {args.tokens} generated tokens, greedy; per-token at positions 5 and 60 "
          f"from a {args.long_tokens}-token run; {args.reps} reps (median)")
    print(f"{'':>22} {'describe ms':>12} {'vs torch':>9} {'encoder':>8} {'prefill':>8} "
          f"{'tok@5':>7} {'tok@60':>7} {'60/5':>5} {'peak RSS MB':>12}")
    t5, t60 = per_token(pt_long["step_ms"], 5), per_token(pt_long["step_ms"], 60)
    print(f"{'pytorch+transformers':>22} {pt['total']:12.1f} {1.0:9.2f} {pt['encoder']:8.1f} "
          f"{pt['prefill']:8.1f} {t5:7.1f} {t60:7.1f} {t60 / t5:5.2f} {pt['peak_rss_mb']:12.0f}")
    for name, r in rows.items():
        s, l = r[args.tokens], r[args.long_tokens]
        print(f"{'moda-sdk ' + name:>22} {s['describe_ms']:12.1f} {s['describe_ms'] / pt['total']:9.2f} "
              f"{s['encoder_ms']:8.1f} {s['prefill_ms']:8.1f} {l['token_ms_early']:7.1f} "
              f"{l['token_ms_late']:7.1f} {l['token_ms_late'] / l['token_ms_early']:5.2f} "
              f"{(s.get('peak_rss_mb') or 0):12.0f}")
    # bench's one description constrained to the caption schema (a catalog job's default;
    # only for bundles with a schema): the forced text goes in several tokens a run.
    for name, r in rows.items():
        c = r[args.tokens].get("constrained")
        if c:
            print(f"{'constrained ' + name:>22} {c['describe_ms']:12.1f} "
                  f"{c['describe_ms'] / pt['total']:9.2f}   {c['tokens']} tokens in "
                  f"{c['decoder_runs']} decoder runs ({c['listed_runs']} listed)")
    if args.cold:
        print(f"\ncold process, one image, {args.tokens} tokens ({args.cold} alternated rounds):")
        for name, runs in result["cold"].items():
            walls = ", ".join(f"{w:.2f}" for w, _ in runs)
            rss = ", ".join(f"{m:.0f}" for _, m in runs)
            print(f"{name:>22}: {walls} s; peak RSS {rss} MB")


if __name__ == "__main__":
    main()
