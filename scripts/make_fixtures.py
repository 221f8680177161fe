#!/usr/bin/env python3
"""Generate the reference fixtures for MODA's Rust tests (developer-only; CI never runs this).

How to run (from the repository root):

    /work/pyenv/bin/python scripts/make_fixtures.py                 # writes tests/fixtures/
    /work/pyenv/bin/python scripts/make_fixtures.py --full-size DIR  # real-size random backbones (NOT committed)

Versions used to produce the committed fixtures:
    Python 3, torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0,
    Pillow 13.0.0, numpy 2.4.6, regex 2026.11.19 (CPU only).

Everything is deterministic: fixed seeds for numpy and torch, random-weight models built from
configs (no hub downloads). See tests/fixtures/README.md for what each file is and how each
reference was computed.
"""

import argparse
import io
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import regex
import torch
import torch.nn as nn
from PIL import Image, ImageDraw, ImageFilter
from safetensors.torch import load_file, save_file

import transformers
from transformers import (
    AutoTokenizer,
    CLIPConfig,
    CLIPModel,
    CLIPVisionConfig,
    CLIPVisionModelWithProjection,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.image_utils import PILImageResampling, SizeDict
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

ROOT = Path(__file__).resolve().parent.parent
FIX = ROOT / "tests" / "fixtures"

torch.set_grad_enabled(False)


def log(*a):
    print(*a, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------

def save_st(path, tensors, metadata=None):
    tensors = {k: v.detach().contiguous().clone() for k, v in tensors.items()}
    save_file(tensors, str(path), metadata=metadata)


def perturb(model, seed):
    """HF inits biases to 0 and LayerNorm to (1, 0); randomise them so a Rust port that forgets a
    bias or the LayerNorm affine parameters fails the tests."""
    g = torch.Generator().manual_seed(seed)
    for mod in model.modules():
        if isinstance(mod, nn.LayerNorm) and mod.weight is not None:
            mod.weight.copy_(1.0 + 0.1 * torch.randn(mod.weight.shape, generator=g))
            mod.bias.copy_(0.1 * torch.randn(mod.bias.shape, generator=g))
        elif isinstance(mod, nn.Linear) and mod.bias is not None:
            mod.bias.copy_(0.05 * torch.randn(mod.bias.shape, generator=g))


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------

# images for which pixel_values.safetensors also stores the decoded+converted full-size RGB (before resize)
RGB_U8_FOR = ["photo.jpg", "gray.png", "rgba.png", "palette.png", "gray16.png"]
IMAGE_NAMES = ["photo.jpg", "wide.png", "gray.png", "rgba.png", "palette.png", "gray16.png", "small.png"]
# Images with pixel_values references only (not in the CLIP reference batches).
PIXEL_ONLY_NAMES = ["photo_prog422.jpg"]


def gradient(w, h, c0, c1, horizontal=False):
    t = np.linspace(0.0, 1.0, w if horizontal else h, dtype=np.float64)
    t = t[None, :, None] if horizontal else t[:, None, None]
    img = np.array(c0, np.float64)[None, None] * (1 - t) + np.array(c1, np.float64)[None, None] * t
    return np.broadcast_to(img, (h, w, 3)).copy()


def garment(draw, w, h, fill, outline=None):
    # a dress-like silhouette: shoulders, waist, flared skirt
    cx = w / 2
    pts = [
        (cx - 0.12 * w, 0.15 * h), (cx - 0.05 * w, 0.12 * h), (cx + 0.05 * w, 0.12 * h),
        (cx + 0.12 * w, 0.15 * h), (cx + 0.22 * w, 0.22 * h), (cx + 0.15 * w, 0.30 * h),
        (cx + 0.10 * w, 0.45 * h), (cx + 0.30 * w, 0.88 * h), (cx - 0.30 * w, 0.88 * h),
        (cx - 0.10 * w, 0.45 * h), (cx - 0.15 * w, 0.30 * h), (cx - 0.22 * w, 0.22 * h),
    ]
    draw.polygon(pts, fill=fill, outline=outline)


def make_images(outdir):
    rng = np.random.default_rng(20240601)
    outdir.mkdir(parents=True, exist_ok=True)

    # photo.jpg: 300x400 (W x H), photo-like
    w, h = 300, 400
    bg = gradient(w, h, (235, 228, 215), (170, 160, 150))
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    garment(d, w, h, fill=(40, 70, 150), outline=(20, 30, 80))
    d.ellipse((w * 0.42, h * 0.50, w * 0.58, h * 0.56), fill=(200, 40, 60))  # belt buckle-ish
    d.rectangle((10, h - 40, 80, h - 10), fill=(90, 120, 60))
    im = im.filter(ImageFilter.GaussianBlur(1.2))
    a = np.asarray(im).astype(np.float64) + rng.normal(0, 6.0, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "RGB")
    im.save(outdir / "photo.jpg", quality=90)

    # wide.png: 500x260 RGB
    w, h = 500, 260
    bg = gradient(w, h, (250, 250, 255), (120, 180, 200), horizontal=True)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.polygon([(60, 200), (140, 90), (220, 200)], fill=(230, 120, 20))  # shoe-ish wedge
    d.rounded_rectangle((260, 60, 460, 210), radius=30, fill=(30, 30, 30))
    d.ellipse((300, 90, 420, 180), fill=(220, 220, 230))
    im.filter(ImageFilter.GaussianBlur(0.8)).save(outdir / "wide.png")

    # gray.png: mode L, 240x320
    w, h = 240, 320
    g = np.linspace(30, 220, h)[:, None] * np.ones((1, w))
    im = Image.fromarray(g.astype(np.uint8), "L")
    d = ImageDraw.Draw(im)
    garment(d, w, h, fill=90)
    a = np.asarray(im).astype(np.float64) + rng.normal(0, 5.0, (h, w))
    Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "L").save(outdir / "gray.png")

    # rgba.png: mode RGBA, 320x240, varying alpha
    w, h = 320, 240
    rgb = gradient(w, h, (200, 30, 30), (30, 30, 200), horizontal=True)
    alpha = np.linspace(0, 255, w)[None, :] * np.ones((h, 1))
    rgba = np.concatenate([rgb, alpha[..., None]], axis=-1)
    im = Image.fromarray(rgba.round().astype(np.uint8), "RGBA")
    d = ImageDraw.Draw(im)
    d.ellipse((100, 60, 220, 180), fill=(10, 200, 10, 255))
    d.rectangle((10, 10, 60, 60), fill=(255, 255, 0, 0))  # fully transparent, coloured underneath
    d.rectangle((250, 170, 310, 230), fill=(0, 0, 0, 128))
    im.save(outdir / "rgba.png")

    # palette.png: mode P (no transparency), 256x300
    w, h = 256, 300
    bg = gradient(w, h, (250, 240, 200), (60, 90, 40))
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    garment(d, w, h, fill=(160, 20, 90))
    im = im.quantize(colors=48, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
    assert im.mode == "P"
    im.save(outdir / "palette.png")

    # gray16.png: 16-bit grayscale covering the full 0..65535 range, 200x280
    w, h = 200, 280
    g = np.linspace(0, 65535, w)[None, :] * np.ones((h, 1))
    g[100:180, 50:150] = 1000.0  # a dark block (values < 256*4)
    g[20:40, 20:40] = 200.0  # a block < 256 (survives Pillow's clip-to-255 conversion unchanged)
    im = Image.fromarray(g.round().astype(np.uint16))
    assert im.mode == "I;16", im.mode
    im.save(outdir / "gray16.png")
    back = Image.open(outdir / "gray16.png")
    assert back.mode in ("I;16", "I"), back.mode

    # small.png: 150x90 RGB (upscaling path)
    w, h = 150, 90
    bg = gradient(w, h, (20, 20, 20), (240, 240, 240), horizontal=True)
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    d.ellipse((40, 15, 110, 75), fill=(250, 200, 0))
    d.line((0, 0, 149, 89), fill=(255, 0, 0), width=3)
    im.save(outdir / "small.png")

    # photo_prog422.jpg: progressive, 4:2:2 chroma subsampling, odd size 333x517 (W x H)
    # (photo.jpg is baseline 4:2:0); its own generator, so the images above are unchanged.
    rng2 = np.random.default_rng(20240602)
    w, h = 333, 517
    bg = gradient(w, h, (225, 215, 230), (120, 140, 130))
    im = Image.fromarray(bg.astype(np.uint8), "RGB")
    d = ImageDraw.Draw(im)
    garment(d, w, h, fill=(170, 60, 40), outline=(90, 30, 20))
    d.rectangle((w - 90, 20, w - 20, 70), fill=(30, 110, 160))
    im = im.filter(ImageFilter.GaussianBlur(1.0))
    a = np.asarray(im).astype(np.float64) + rng2.normal(0, 6.0, (h, w, 3))
    im = Image.fromarray(np.clip(a, 0, 255).round().astype(np.uint8), "RGB")
    im.save(outdir / "photo_prog422.jpg", quality=85, progressive=True, subsampling="4:2:2")

    (outdir / "not_an_image.jpg").write_bytes(b"this is not an image, just text\n")

    modes = {n: Image.open(outdir / n).mode for n in IMAGE_NAMES}
    log("image modes:", modes)
    return modes


def processor_rgb_u8(proc, img):
    """The processor's own RGB conversion, as HWC uint8 (alpha composited onto white)."""
    chw = proc.process_image(img, do_convert_rgb=True)
    return np.ascontiguousarray(np.moveaxis(chw, 0, -1))


def processor_resized_u8(proc, img, shortest_edge):
    """The processor's own resize step (before crop), HWC uint8."""
    chw = proc.process_image(img, do_convert_rgb=True)
    out = proc.resize(chw, SizeDict(shortest_edge=shortest_edge), resample=PILImageResampling.BICUBIC)
    assert out.dtype == np.uint8, out.dtype
    return np.ascontiguousarray(np.moveaxis(out, 0, -1))


def independent_resized_u8(img, shortest_edge):
    """Same thing computed directly with Pillow, to verify the processor's behaviour."""
    has_alpha = "A" in img.getbands() or img.info.get("transparency") is not None
    if has_alpha:
        bg = Image.new("RGBA", img.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(bg, img.convert("RGBA")).convert("RGB")
    else:
        rgb = img.convert("RGB")
    w, h = rgb.size
    short, long = (w, h) if w <= h else (h, w)
    new_short, new_long = shortest_edge, int(shortest_edge * long / short)
    nh, nw = (new_long, new_short) if w <= h else (new_short, new_long)
    return np.asarray(rgb.resize((nw, nh), resample=Image.BICUBIC)), rgb


def independent_pixel_values(resized_hwc, crop):
    """center crop (HF convention), /255 in float64, normalise in float64 -> float32."""
    h, w, _ = resized_hwc.shape
    top = (h - crop) // 2
    left = (w - crop) // 2
    x = resized_hwc[top:top + crop, left:left + crop].astype(np.float64) * (1 / 255)
    mean = np.array(CLIPImageProcessorPil.image_mean)
    std = np.array(CLIPImageProcessorPil.image_std)
    x = (x - mean) / std
    return np.moveaxis(x, -1, 0)[None].astype(np.float32)


def make_pixel_values(imgdir):
    proc = CLIPImageProcessorPil()
    assert proc.size == {"shortest_edge": 224} or getattr(proc.size, "shortest_edge", None) == 224
    out = {}
    notes = {}
    for n in IMAGE_NAMES + PIXEL_ONLY_NAMES:
        img = Image.open(imgdir / n)
        pv = proc(images=img, return_tensors="pt")["pixel_values"]
        assert pv.shape == (1, 3, 224, 224) and pv.dtype == torch.float32, (pv.shape, pv.dtype)
        rgb = processor_rgb_u8(proc, img)
        rs = processor_resized_u8(proc, img, 224)
        rs2, rgb2 = independent_resized_u8(img, 224)
        assert np.array_equal(rgb, np.asarray(rgb2)), n
        assert np.array_equal(rs, rs2), n
        pv2 = independent_pixel_values(rs, 224)
        err = float(np.abs(pv.numpy() - pv2).max())
        assert err < 1e-6, (n, err)
        plain = np.asarray(img.convert("RGB"))
        notes[n] = {
            "mode": img.mode,
            "size_wh": list(img.size),
            "resized_hw": list(rs.shape[:2]),
            "processor_rgb_equals_plain_convert_RGB": bool(np.array_equal(plain, rgb)),
        }
        out[n] = pv
        out[f"{n}.resized_u8"] = torch.from_numpy(rs)
        if n in RGB_U8_FOR or n in PIXEL_ONLY_NAMES:
            out[f"{n}.rgb_u8"] = torch.from_numpy(rgb)
    save_st(FIX / "pixel_values.safetensors", out)
    log("pixel_values notes:", json.dumps(notes))
    return notes


# ----------------------------------------------------------------------------------------------
# CLIP
# ----------------------------------------------------------------------------------------------

def clip_references(model, size, imgdir, vision_only):
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    ref = {}
    pvs = []
    for n in IMAGE_NAMES:
        img = Image.open(imgdir / n)
        pv = proc(images=img, return_tensors="pt")["pixel_values"]
        assert pv.shape == (1, 3, size, size)
        if vision_only:
            emb = model(pixel_values=pv).image_embeds
            vm, proj = model.vision_model, model.visual_projection
        else:
            feats = model.get_image_features(pixel_values=pv)
            # transformers 5: get_image_features returns BaseModelOutputWithPooling whose
            # pooler_output is the *projected* embedding (not a bare tensor as in 4.x).
            emb = feats.pooler_output if not torch.is_tensor(feats) else feats
            vm, proj = model.vision_model, model.visual_projection
        # manual check: visual_projection(post_layernorm(CLS of last_hidden_state)), not normalised
        hs = vm(pixel_values=pv).last_hidden_state
        manual = proj(vm.post_layernorm(hs[:, 0, :]))
        assert torch.allclose(emb, manual, atol=1e-6), (emb - manual).abs().max()
        ref[f"pixel_values.{n}"] = pv
        ref[f"image_embeds.{n}"] = emb
        pvs.append(pv)
    batch = torch.cat(pvs, 0)
    if vision_only:
        bemb = model(pixel_values=batch).image_embeds
    else:
        bemb = model.get_image_features(pixel_values=batch).pooler_output
    single = torch.cat([ref[f"image_embeds.{n}"] for n in IMAGE_NAMES], 0)
    assert torch.allclose(bemb, single, atol=1e-5), (bemb - single).abs().max()
    ref["batch.pixel_values"] = batch
    ref["batch.image_embeds"] = bemb
    return proc, ref


def make_clip_gelu(imgdir):
    d = FIX / "clip_gelu"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(1001)
    cfg = CLIPConfig(
        text_config=dict(
            vocab_size=99, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            max_position_embeddings=16, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=24,
            pad_token_id=1, bos_token_id=97, eos_token_id=98,
        ),
        vision_config=dict(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, image_size=64,
            patch_size=16, num_channels=3, hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=24,
        ),
        projection_dim=24,
    )
    model = CLIPModel(cfg).eval()
    perturb(model, 1002)
    model.save_pretrained(d)
    assert (d / "model.safetensors").exists()
    model = CLIPModel.from_pretrained(d).eval()
    proc, ref = clip_references(model, 64, imgdir, vision_only=False)
    proc.save_pretrained(d)
    save_st(d / "reference.safetensors", ref, metadata={"batch_order": ",".join(IMAGE_NAMES)})
    keys = sorted(load_file(str(d / "model.safetensors")).keys())
    return model, ref, keys


def make_clip_quick(imgdir):
    d = FIX / "clip_quick"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(2001)
    cfg = CLIPVisionConfig(
        hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=6, image_size=32,
        patch_size=8, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=16,
    )
    model = CLIPVisionModelWithProjection(cfg).eval()
    perturb(model, 2002)
    sd16 = {k: v.detach().to(torch.float16).contiguous().clone() for k, v in model.state_dict().items()}
    # Older (transformers 4.x era) CLIP checkpoints, including pytorch_model.bin files on the hub, also
    # carry the int64 position_ids buffer; include it so loaders learn to tolerate/ignore it.
    npos = (cfg.image_size // cfg.patch_size) ** 2 + 1
    sd16["vision_model.embeddings.position_ids"] = torch.arange(npos, dtype=torch.int64)[None]
    cfg.architectures = ["CLIPVisionModelWithProjection"]
    cfg.dtype = "float16"  # what the stored weights are; references are computed in fp32
    cfg.save_pretrained(d)
    torch.save(sd16, d / "pytorch_model.bin")  # default zip-based serialization
    # references use the fp16-rounded weights cast back to fp32
    sd32 = {k: v.float() for k, v in sd16.items() if k != "vision_model.embeddings.position_ids"}
    missing, unexpected = model.load_state_dict(sd32, strict=True), None
    model = model.float().eval()
    # cross-check: transformers' own loader on the .bin gives the same model
    m2 = CLIPVisionModelWithProjection.from_pretrained(d, dtype=torch.float32).eval()
    for k, v in model.state_dict().items():
        assert torch.equal(v, m2.state_dict()[k]), k
    proc, ref = clip_references(model, 32, imgdir, vision_only=True)
    proc.save_pretrained(d)
    save_st(d / "reference.safetensors", ref, metadata={"batch_order": ",".join(IMAGE_NAMES)})
    return sorted(sd16.keys())


# ----------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------

COLOURS = ["Blue", "Black", "White", "Red", "Green", "Pink", "Grey", "Navy Blue", "Brown", "Yellow", "Purple",
           "Beige", "Maroon", "Olive", "Orange", "Silver", "Gold", "Multi"]
USAGES = ["Casual", "Formal", "Sports", "Ethnic", "Party", "Smart Casual"]
ITEMS = [("Apparel", "Topwear", ["Tshirts", "Shirts", "Tops", "Kurtas", "Sweatshirts", "Jackets", "Dresses"]),
         ("Apparel", "Bottomwear", ["Jeans", "Shorts", "Trousers", "Skirts", "Track Pants", "Capris"]),
         ("Footwear", "Shoes", ["Casual Shoes", "Sports Shoes", "Formal Shoes", "Heels", "Flats"]),
         ("Footwear", "Flip Flops", ["Flip Flops"]),
         ("Footwear", "Sandal", ["Sandals"])]
GENDERS = ["Boys", "Girls", "Men", "Women"]

EXTRA_SENTENCES = """The quick brown fox jumps over the lazy dog.
A photo of a red dress on a white background.
This product is made of soft cotton and is machine washable.
She wore a beautiful blue skirt with white sneakers to the party.
He bought two pairs of running shoes, one black and one grey.
Hello world! How are you today? I'm fine, thanks; and you?
Price: $29.99 (incl. tax) - free shipping over $50.
The model is 5'9" and wears size M.
Wash cold, tumble dry low, do not bleach.
Summer collection 2024: linen shirts, shorts and sandals.
A café in Zürich serves crème brûlée and jalapeño nachos.
Señor Müller's naïve façade was déjà vu.
Describe the image in one sentence.
It's a long-sleeved cotton shirt with a button-down collar.
Comfortable, stylish, and affordable: what more could you want?
These heels are 3 inches high and come in black, nude, and red.
Our new arrivals include jackets, jeans, and t-shirts for the whole family.
Numbers like 1, 22, 333 and 4444 appear too.
""".strip().split("\n")


def caption(colour, usage, ptype, gender, cat, sub):
    return f"{colour} {usage} {ptype} for {gender} - {cat} {sub}"


def corpus_lines():
    rng = np.random.default_rng(7)
    lines = []
    for _ in range(1500):
        cat, sub, types = ITEMS[rng.integers(len(ITEMS))]
        lines.append(caption(COLOURS[rng.integers(len(COLOURS))], USAGES[rng.integers(len(USAGES))],
                             types[rng.integers(len(types))], GENDERS[rng.integers(len(GENDERS))], cat, sub))
    lines += EXTRA_SENTENCES * 20
    return lines


SPECIAL_AT = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3}
TOKENIZER_FILES = ["vocab.json", "merges.txt", "special_tokens_map.json", "tokenizer_config.json", "tokenizer.json"]


def _added(content):
    return {"content": content, "single_word": False, "lstrip": False, "rstrip": False, "normalized": True}


class ReferenceGPT2BPE:
    """The classic (slow) GPT-2 byte-level BPE algorithm, as in transformers 4.x GPT2Tokenizer
    (transformers 5 no longer ships a pure-Python GPT2Tokenizer: `GPT2Tokenizer` is now backed by
    the `tokenizers` library). Added tokens `</s>` and `<pad>` are split out of the text first,
    as the slow tokenizer did; bos `</s>` (2) is prepended (add_bos_token=true)."""

    PAT = regex.compile(r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+""")

    def __init__(self, d):
        self.encoder = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
        merges = (d / "merges.txt").read_text(encoding="utf-8").split("\n")
        merges = [tuple(m.split()) for m in merges if m and not m.startswith("#version")]
        self.ranks = {m: i for i, m in enumerate(merges)}
        bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
            list(range(ord("®"), ord("ÿ") + 1))
        cs = bs[:]
        n = 0
        for b in range(256):
            if b not in bs:
                bs.append(b)
                cs.append(256 + n)
                n += 1
        self.byte_encoder = dict(zip(bs, map(chr, cs)))
        self.added = ["</s>", "<pad>"]

    def bpe(self, token):
        word = tuple(token)
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, float("inf")))
            if best not in self.ranks:
                break
            first, second = best
            new, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and word[i] == first and word[i + 1] == second:
                    new.append(first + second)
                    i += 2
                else:
                    new.append(word[i])
                    i += 1
            word = tuple(new)
        return word

    def encode_plain(self, text):
        ids = []
        for tok in self.PAT.findall(text):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids += [self.encoder[t] for t in self.bpe(tok)]
        return ids

    def __call__(self, text):
        pat = regex.compile("(" + "|".join(regex.escape(a) for a in self.added) + ")")
        ids = [SPECIAL_AT["</s>"]]
        for part in pat.split(text):
            if part in self.added:
                ids.append(self.encoder[part])
            elif part:
                ids += self.encode_plain(part)
        return ids


TOKENIZER_CASES = [
    "Blue Casual Jeans for Boys - Apparel Bottomwear",
    "Black Formal Shoes for Men - Footwear Shoes",
    "Navy Blue Smart Casual Tshirts for Women - Apparel Topwear",
    "White Sports Sports Shoes for Girls - Footwear Shoes</s>",
    "",
    " ",
    " leading space",
    "trailing space ",
    "multiple   spaces\tand\ttabs",
    "   ",
    "Hello, world! (a) [b] {c}; x: y? \"quoted\" 'single' -- em—dash",
    "It's they're we've I'm you'll he'd",
    "Crème brûlée, café, Zürich, über, niño, señor, ñ é ü",
    "時尚的連衣裙 ファッション 패션",
    "New dress 👗 and heels 👠!",
    "line one\nline two\r\nline three\n",
    "literal </s> in the middle and <pad> too",
    "<s> and <unk> are not added tokens",
    "price $29.99, size 42, 100% cotton",
    "UPPER lower MiXeD 12345 67890",
]


def make_tokenizer():
    from tokenizers import ByteLevelBPETokenizer

    d = FIX / "tokenizer"
    d.mkdir(parents=True, exist_ok=True)
    tok = ByteLevelBPETokenizer(add_prefix_space=False)
    tok.train_from_iterator(corpus_lines(), vocab_size=597, min_frequency=2,
                            special_tokens=["<s>", "<pad>", "</s>", "<unk>"], show_progress=False)
    tok.save_model(str(d))
    vocab = json.loads((d / "vocab.json").read_text(encoding="utf-8"))
    for t, i in SPECIAL_AT.items():
        assert vocab[t] == i, (t, vocab[t])
    (d / "special_tokens_map.json").write_text(json.dumps({
        "bos_token": _added("</s>"), "eos_token": _added("</s>"), "unk_token": _added("</s>"),
        "pad_token": _added("<pad>"),
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    at = lambda c: dict(_added(c), __type="AddedToken")  # noqa: E731
    (d / "tokenizer_config.json").write_text(json.dumps({
        "errors": "replace",
        "unk_token": at("</s>"),
        "bos_token": at("</s>"),
        "eos_token": at("</s>"),
        "pad_token": at("<pad>"),
        "add_prefix_space": False,
        "model_max_length": 1000000000000000019884624838656,
        "special_tokens_map_file": None,
        "add_bos_token": True,
        "tokenizer_class": "GPT2Tokenizer",
    }, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

    # tokenizer.json as transformers' fast tokenizer writes it when loaded from those files
    fast0 = AutoTokenizer.from_pretrained(str(d))
    with tempfile.TemporaryDirectory() as tmp:
        fast0.save_pretrained(tmp)
        shutil.copy(Path(tmp) / "tokenizer.json", d / "tokenizer.json")
    fast = AutoTokenizer.from_pretrained(str(d))  # now loads tokenizer.json too

    ref = ReferenceGPT2BPE(d)
    cases = []
    mismatches = []
    for text in TOKENIZER_CASES:
        ids = ref(text)
        f0 = fast0(text)["input_ids"]
        f1 = fast(text)["input_ids"]
        from tokenizers import Tokenizer
        raw = Tokenizer.from_file(str(d / "tokenizer.json")).encode(text).ids
        assert ids[0] == 2 and f1[0] == 2 and raw[0] == 2, (text, ids, f1, raw)
        if not (ids == f0 == f1 == raw):
            mismatches.append({"text": text, "reference": ids, "fast_from_files": f0, "fast_json": f1,
                               "tokenizers_raw": raw})
        # decoding round trip (skip_special_tokens drops the BOS)
        cases.append({"text": text, "ids": ids, "fast_ids": f1,
                      "decoded": fast.decode(f1, skip_special_tokens=False)})
    if mismatches:
        log("TOKENIZER MISMATCHES:", json.dumps(mismatches, ensure_ascii=False, indent=1))
    assert not mismatches
    (d / "tokenizer_cases.json").write_text(json.dumps(cases, indent=1, ensure_ascii=False) + "\n",
                                            encoding="utf-8")
    return d, len(vocab), ref, fast


# ----------------------------------------------------------------------------------------------
# OPT
# ----------------------------------------------------------------------------------------------

def opt_inputs(ref_tok, vocab_size, embed_dim):
    a = ref_tok("Blue Casual Jeans for Boys - Apparel Bottomwear")[:7]
    b = ref_tok("Hello, world! How are you today?")[:7]
    assert len(a) == len(b) == 7
    ids = torch.tensor([a, b], dtype=torch.long)
    seqs = [ref_tok("Pink Party Dresses for Girls - Apparel Topwear")[:7],
            ref_tok("A café in Zürich")[:4],
            ref_tok("Hi")[:2]]
    T = max(len(s) for s in seqs)
    assert [len(s) for s in seqs] == [7, 4, 2], [len(s) for s in seqs]
    left_ids, left_mask, right_ids, right_mask = [], [], [], []
    for s in seqs:
        p = T - len(s)
        left_ids.append([1] * p + s)
        left_mask.append([0] * p + [1] * len(s))
        right_ids.append(s + [1] * p)
        right_mask.append([1] * len(s) + [0] * p)
    g = torch.Generator().manual_seed(4242)
    embeds = torch.randn(1, 5, embed_dim, generator=g)
    return ids, (torch.tensor(left_ids), torch.tensor(left_mask)), \
        (torch.tensor(right_ids), torch.tensor(right_mask)), embeds


def opt_references(model, ids, left, right, embeds):
    ref = {}
    ref["ids.input_ids"] = ids
    ref["ids.logits"] = model(input_ids=ids).logits
    for name, (i, m) in (("padded", left), ("rpadded", right)):
        ref[f"{name}.input_ids"] = i
        ref[f"{name}.attention_mask"] = m
        lg = model(input_ids=i, attention_mask=m).logits
        ref[f"{name}.logits"] = lg
        # sanity: each row's valid positions equal the unpadded single-sequence forward
        for r in range(i.shape[0]):
            keep = m[r].bool()
            solo = model(input_ids=i[r:r + 1, keep]).logits[0]
            err = (lg[r, keep] - solo).abs().max().item()
            assert err < 1e-4, (name, r, err)
    ref["embeds.inputs_embeds"] = embeds
    ref["embeds.logits"] = model(inputs_embeds=embeds, attention_mask=torch.ones(1, 5, dtype=torch.long)).logits
    # cross-check against the eager attention implementation at valid positions
    return ref


def check_eager(d, ref):
    m = OPTForCausalLM.from_pretrained(d, attn_implementation="eager").eval()
    for name in ("padded", "rpadded"):
        lg = m(input_ids=ref[f"{name}.input_ids"], attention_mask=ref[f"{name}.attention_mask"]).logits
        keep = ref[f"{name}.attention_mask"].bool()
        err = (lg[keep] - ref[f"{name}.logits"][keep]).abs().max().item()
        assert err < 1e-5, (d, name, err)
    lg = m(input_ids=ref["ids.input_ids"]).logits
    assert (lg - ref["ids.logits"]).abs().max().item() < 1e-5


def copy_tokenizer(tokdir, d):
    for f in TOKENIZER_FILES:
        shutil.copy(tokdir / f, d / f)


def make_opt_preln(tokdir, V, ref_tok):
    d = FIX / "opt_preln"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(3001)
    cfg = OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=32, do_layer_norm_before=True,
                    activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    tie_word_embeddings=True, init_std=0.3)
    # init_std 0.3 (not 0.02): with tiny random weights the tied lm_head just repeats the input token,
    # which would make the greedy fixture trivial.
    model = OPTForCausalLM(cfg).eval()
    perturb(model, 3002)
    model.save_pretrained(d)
    copy_tokenizer(tokdir, d)
    keys = sorted(load_file(str(d / "model.safetensors")).keys())
    assert all(k.startswith("model.decoder.") for k in keys), keys
    model = OPTForCausalLM.from_pretrained(d).eval()
    assert model.lm_head.weight.data_ptr() == model.model.decoder.embed_tokens.weight.data_ptr()
    ids, left, right, embeds = opt_inputs(ref_tok, V, 32)
    ref = opt_references(model, ids, left, right, embeds)
    save_st(d / "reference.safetensors", ref)
    check_eager(d, ref)
    return model, keys


def make_opt_postln(tokdir, V, ref_tok):
    d = FIX / "opt_postln"
    d.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(4001)
    cfg = OPTConfig(vocab_size=V, hidden_size=32, num_hidden_layers=2, ffn_dim=64, num_attention_heads=4,
                    max_position_embeddings=64, word_embed_proj_dim=16, do_layer_norm_before=False,
                    activation_function="relu", pad_token_id=1, bos_token_id=2, eos_token_id=2,
                    tie_word_embeddings=False, init_std=0.3)
    model = OPTForCausalLM(cfg).eval()
    perturb(model, 4002)
    assert model.model.decoder.final_layer_norm is None
    assert model.model.decoder.project_in is not None and model.model.decoder.project_out is not None
    sd = {}
    for k, v in model.state_dict().items():
        assert k.startswith("model.decoder.") or k == "lm_head.weight", k
        sd[k[len("model."):] if k.startswith("model.") else k] = v.detach().contiguous().clone()
    shard1 = {k: v for k, v in sd.items() if not (k.startswith("decoder.layers.1.") or k == "lm_head.weight")}
    shard2 = {k: v for k, v in sd.items() if k not in shard1}
    f1, f2 = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    save_file(shard1, str(d / f1), metadata={"format": "pt"})
    save_file(shard2, str(d / f2), metadata={"format": "pt"})
    total = sum(v.numel() * v.element_size() for v in sd.values())
    index = {"metadata": {"total_size": total},
             "weight_map": {k: (f1 if k in shard1 else f2) for k in sorted(sd)}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    cfg.architectures = ["OPTForCausalLM"]
    cfg.dtype = "float32"
    cfg.save_pretrained(d)
    copy_tokenizer(tokdir, d)
    reloaded, info = OPTForCausalLM.from_pretrained(d, output_loading_info=True)
    reloaded.eval()
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k]), k
    ids, left, right, embeds = opt_inputs(ref_tok, V, 16)
    ref = opt_references(reloaded, ids, left, right, embeds)
    save_st(d / "reference.safetensors", ref)
    check_eager(d, ref)
    return sorted(sd.keys())


# ----------------------------------------------------------------------------------------------
# MODA (the original recipe's module)
# ----------------------------------------------------------------------------------------------

class FashionOPT(nn.Module):
    """As in the original notebook."""

    def __init__(self, opt_config, clip_proj_dim):
        super().__init__()
        self.opt = OPTForCausalLM(opt_config)
        self.embed_tokens = self.opt.get_input_embeddings()
        hidden = opt_config.hidden_size
        torch.manual_seed(5001)  # fixed projector init
        self.projection = nn.Sequential(nn.Linear(clip_proj_dim, 4 * hidden), nn.GELU(), nn.Linear(4 * hidden, hidden))


def make_moda(clip_ref, clip_proj_dim, ref_tok):
    d = FIX / "moda"
    d.mkdir(parents=True, exist_ok=True)
    opt_src = OPTForCausalLM.from_pretrained(FIX / "opt_preln").eval()
    m = FashionOPT(opt_src.config, clip_proj_dim)
    # Projector re-initialised N(0, 0.3) weights / N(0, 0.1) biases (fixed seed): with nn.Linear's default
    # init the two tiny-CLIP embeddings give near-identical prefixes and identical greedy outputs.
    g = torch.Generator().manual_seed(5002)
    for lin in (m.projection[0], m.projection[2]):
        lin.weight.copy_(0.3 * torch.randn(lin.weight.shape, generator=g))
        lin.bias.copy_(0.1 * torch.randn(lin.bias.shape, generator=g))
    m.opt.load_state_dict(opt_src.state_dict())
    m.opt.tie_weights()
    m.eval()
    assert m.embed_tokens.weight.data_ptr() == m.opt.lm_head.weight.data_ptr()
    torch.save(m.state_dict(), d / "fashion_opt.pth")
    # The same checkpoint with two tensors no MODA module has: loaders must list them.
    extra = dict(m.state_dict())
    extra["extra.weight"] = torch.zeros(2, 2)
    extra["extra.bias"] = torch.zeros(2)
    torch.save(extra, d / "fashion_opt_extra_keys.pth")
    save_st(d / "projector.safetensors", {k: v for k, v in m.state_dict().items() if k.startswith("projection.")})
    pth_keys = list(m.state_dict().keys())

    # reload the .pth into a fresh module (as a user would) and compute everything from that
    m2 = FashionOPT(opt_src.config, clip_proj_dim)
    sd = torch.load(d / "fashion_opt.pth", weights_only=True)
    m2.load_state_dict(sd)
    m2.eval()
    m = m2

    image_embeds = torch.cat([clip_ref["image_embeds.photo.jpg"], clip_ref["image_embeds.wide.png"]], 0)
    prefix = m.projection(image_embeds).unsqueeze(1)
    caps = ["Blue Casual Jeans for Boys - Apparel Bottomwear",
            "Navy Blue Smart Casual Tshirts for Women - Apparel Topwear"]
    toks = [ref_tok(c) + [2] for c in caps]
    assert len(toks[0]) != len(toks[1])
    T = max(len(t) for t in toks)
    input_ids = torch.tensor([t + [1] * (T - len(t)) for t in toks])
    attention_mask = torch.tensor([[1] + [1] * len(t) + [0] * (T - len(t)) for t in toks])
    labels = torch.tensor([[-100] + t + [-100] * (T - len(t)) for t in toks])
    inputs_embeds = torch.cat([prefix, m.embed_tokens(input_ids)], 1)
    out = m.opt(inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels)
    # manual loss: logits at i predict label i+1, mean over non-ignored
    lg = out.logits[:, :-1].reshape(-1, out.logits.shape[-1])
    manual = nn.functional.cross_entropy(lg, labels[:, 1:].reshape(-1), ignore_index=-100)
    assert torch.allclose(out.loss, manual, atol=1e-6), (out.loss, manual)

    # greedy: [prefix, BOS] then 8 argmax steps, full recompute each step, all-ones mask
    emb = torch.cat([prefix, m.embed_tokens(torch.full((2, 1), 2, dtype=torch.long))], 1)
    gen = []
    min_margin = float("inf")
    for _ in range(8):
        logits = m.opt(inputs_embeds=emb, attention_mask=torch.ones(emb.shape[:2], dtype=torch.long)).logits
        top2 = logits[:, -1].topk(2, -1).values
        min_margin = min(min_margin, (top2[:, 0] - top2[:, 1]).min().item())
        nxt = logits[:, -1].argmax(-1)
        gen.append(nxt)
        emb = torch.cat([emb, m.embed_tokens(nxt[:, None])], 1)
    greedy = torch.stack(gen, 1)
    assert not torch.equal(greedy[0], greedy[1])
    assert min_margin > 1e-3, min_margin  # argmax must be robust to float noise
    log(f"greedy top1-top2 min margin: {min_margin:.4f}")

    ref = {
        "image_embeds": image_embeds,
        "prefix_embeds": prefix,
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "labels": labels,
        "loss": out.loss.reshape(()),
        "logits": out.logits,
        "greedy.tokens": greedy,
    }
    save_st(d / "reference.safetensors", ref)
    return pth_keys, ref


# ----------------------------------------------------------------------------------------------
# One training step of the original recipe (trainer's parity test)
# ----------------------------------------------------------------------------------------------

TRAIN_STEP_TENSORS = [
    "projection.0.weight", "projection.0.bias", "projection.2.weight", "projection.2.bias",
    "opt.model.decoder.layers.0.self_attn.q_proj.weight",
    "opt.model.decoder.embed_tokens.weight",  # tied with lm_head: one parameter, two uses
]


def make_train_step(ref_tok, clip_proj_dim):
    """Two AdamW steps of the recipe on the FashionOPT of moda/fashion_opt.pth: each step is a batch of 4
    split into 2 micro-batches (gradient accumulation 2, loss / 2), clip_grad_norm_(1.0), AdamW(lr=1e-3,
    PyTorch defaults: betas (0.9, 0.999), eps 1e-8, weight_decay 0.01). Dropout off (eval mode), gradients on."""
    d = FIX / "train_step"
    d.mkdir(parents=True, exist_ok=True)
    opt_src = OPTForCausalLM.from_pretrained(FIX / "opt_preln")
    m = FashionOPT(opt_src.config, clip_proj_dim)
    m.load_state_dict(torch.load(FIX / "moda" / "fashion_opt.pth", weights_only=True))
    m.opt.tie_weights()
    m.eval()
    g = torch.Generator().manual_seed(6001)
    image_embeds = 0.5 * torch.randn(4, clip_proj_dim, generator=g)
    caps = ["Blue Casual Jeans for Boys - Apparel Bottomwear",
            "Navy Blue Smart Casual Tshirts for Women - Apparel Topwear",
            "Black Formal Shoes for Men - Footwear Shoes",
            "Pink Party Dresses for Girls - Apparel Dress"]
    toks = [ref_tok(c) + [2] for c in caps]
    T = max(len(t) for t in toks)
    input_ids = torch.tensor([t + [1] * (T - len(t)) for t in toks])
    text_mask = torch.tensor([[1] * len(t) + [0] * (T - len(t)) for t in toks])
    params = dict(m.named_parameters())  # the tied lm_head is not listed twice
    assert "opt.lm_head.weight" not in params
    optim = torch.optim.AdamW(m.parameters(), lr=1e-3)
    ref = {"image_embeds": image_embeds, "input_ids": input_ids, "text_mask": text_mask}
    for name in TRAIN_STEP_TENSORS:
        ref[f"before.{name}"] = params[name].detach().clone()
    with torch.enable_grad():
        for step in (1, 2):
            optim.zero_grad()
            for mb in (0, 1):
                sl = slice(2 * mb, 2 * mb + 2)
                prefix = m.projection(image_embeds[sl]).unsqueeze(1)
                emb = torch.cat([prefix, m.embed_tokens(input_ids[sl])], 1)
                am = torch.cat([torch.ones(2, 1, dtype=torch.long), text_mask[sl]], 1)
                labels = torch.cat([torch.full((2, 1), -100), input_ids[sl].masked_fill(text_mask[sl] == 0, -100)], 1)
                loss = m.opt(inputs_embeds=emb, attention_mask=am, labels=labels).loss
                ref[f"step{step}.loss{mb}"] = loss.detach().reshape(())
                (loss / 2).backward()
            norm = torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0)
            ref[f"step{step}.grad_norm"] = norm.detach().reshape(())
            optim.step()
            for name in TRAIN_STEP_TENSORS:
                ref[f"step{step}.{name}"] = params[name].detach().clone()
    save_st(d / "reference.safetensors", ref)
    log(f"train_step: losses {[round(float(ref[k]), 5) for k in sorted(ref) if '.loss' in k]}, "
        f"grad norms {float(ref['step1.grad_norm']):.4f} {float(ref['step2.grad_norm']):.4f}")
    return ref


# ----------------------------------------------------------------------------------------------
# Full-size random backbones (memory benchmarks; not committed)
# ----------------------------------------------------------------------------------------------

def make_full_size(out):
    out = Path(out)
    torch.manual_seed(9001)
    vis = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
               image_size=224, patch_size=32, num_channels=3, hidden_act="quick_gelu", layer_norm_eps=1e-5,
               projection_dim=512)
    log("clip-vit-b32 ...")
    m = CLIPVisionModelWithProjection(CLIPVisionConfig(**vis)).eval()
    m.save_pretrained(out / "clip-vit-b32")
    CLIPImageProcessorPil().save_pretrained(out / "clip-vit-b32")
    del m
    log("clip-full ...")
    cfg = CLIPConfig(text_config=dict(hidden_act="quick_gelu", projection_dim=512), vision_config=vis,
                     projection_dim=512)
    m = CLIPModel(cfg).eval()
    m.save_pretrained(out / "clip-full")
    CLIPImageProcessorPil().save_pretrained(out / "clip-full")
    del m
    log("opt-125m ...")
    cfg = OPTConfig(vocab_size=50272, hidden_size=768, num_hidden_layers=12, ffn_dim=3072, num_attention_heads=12,
                    max_position_embeddings=2048, word_embed_proj_dim=768, do_layer_norm_before=True,
                    activation_function="relu", dropout=0.1, attention_dropout=0.0, pad_token_id=1,
                    bos_token_id=2, eos_token_id=2, tie_word_embeddings=True, enable_bias=True)
    m = OPTForCausalLM(cfg).eval()
    m.save_pretrained(out / "opt-125m")
    for sub in ("clip-vit-b32", "clip-full", "opt-125m"):
        for f in sorted((out / sub).iterdir()):
            log(f"  {f}  {f.stat().st_size} bytes")


# ----------------------------------------------------------------------------------------------

def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--full-size", metavar="DIR", help="write real-size random backbones to DIR instead")
    args = ap.parse_args()
    log(f"torch {torch.__version__}, transformers {transformers.__version__}")
    if args.full_size:
        make_full_size(args.full_size)
        return

    FIX.mkdir(parents=True, exist_ok=True)
    imgdir = FIX / "images"
    make_images(imgdir)
    notes = make_pixel_values(imgdir)
    clip_model, clip_ref, clip_keys = make_clip_gelu(imgdir)
    quick_keys = make_clip_quick(imgdir)
    tokdir, ntok, ref_tok, fast = make_tokenizer()
    V = (ntok + 7) // 8 * 8
    log(f"tokenizer vocab {ntok} -> OPT vocab_size {V}")
    _, preln_keys = make_opt_preln(tokdir, V, ref_tok)
    postln_keys = make_opt_postln(tokdir, V, ref_tok)
    pth_keys, moda_ref = make_moda(clip_ref, 24, ref_tok)
    make_train_step(ref_tok, 24)
    summary = {
        "image_notes": notes, "tokenizer_vocab": ntok, "opt_vocab_size": V,
        "clip_gelu_keys": clip_keys, "clip_quick_keys": quick_keys,
        "opt_preln_keys": preln_keys, "opt_postln_keys": postln_keys, "fashion_opt_pth_keys": pth_keys,
        "moda_loss": float(moda_ref["loss"]), "greedy": moda_ref["greedy.tokens"].tolist(),
        "moda_input_ids": moda_ref["input_ids"].tolist(),
    }
    for f in FIX.rglob("*"):
        os.chmod(f, 0o755 if f.is_dir() else 0o644)  # safetensors writes files 0600
    print(json.dumps(summary, indent=1, ensure_ascii=False))


if __name__ == "__main__":
    main()
