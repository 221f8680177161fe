#!/usr/bin/env python3
"""Writes the seed inputs of the fuzz targets into tests/fuzz/corpus/<target>/.

The committed corpora are these seeds plus what fuzzing added, minimised with `cargo fuzz cmin`
(see README.md); `--clean` empties the corpora first, to start over. It needs Python 3 and, for the
image seeds in formats the fixtures lack, Pillow (`pip install pillow`; without it those are
left out). Run from anywhere: python3 tests/fuzz/make_seeds.py
"""

import io
import json
import pickle
import shutil
import struct
import sys
import types
import zipfile
from collections import OrderedDict
from pathlib import Path

FUZZ = Path(__file__).resolve().parent
ROOT = FUZZ.parent.parent
FIXTURES = ROOT / "tests" / "fixtures"
CORPUS = FUZZ / "corpus"


def put(target, name, data):
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    if isinstance(data, str):
        data = data.encode()
    (d / name).write_bytes(data)


# ---------------------------------------------------------------- image
def images():
    for p in sorted((FIXTURES / "images").iterdir()):
        if p.stat().st_size <= 64 << 10:
            put("image", p.name, p.read_bytes())
    try:
        from PIL import Image
    except ImportError:
        print("Pillow not installed: only the fixture images are seeds", file=sys.stderr)
        return
    rgb = Image.new("RGB", (13, 7))
    for x in range(13):
        for y in range(7):
            rgb.putpixel((x, y), (x * 19, y * 36, (x * y) % 256))

    def save(name, img, fmt, **kw):
        b = io.BytesIO()
        img.save(b, fmt, **kw)
        put("image", name, b.getvalue())

    save("tiny.jpg", rgb, "JPEG", quality=80)
    save("tiny_prog.jpg", rgb, "JPEG", quality=80, progressive=True)
    save("tiny_gray.jpg", rgb.convert("L"), "JPEG")
    save("tiny_cmyk.jpg", rgb.convert("CMYK"), "JPEG")
    save("tiny.gif", rgb.convert("P"), "GIF")
    save("tiny.bmp", rgb, "BMP")
    save("tiny.tiff", rgb, "TIFF")
    save("tiny.webp", rgb, "WEBP", lossless=True)
    save("tiny_lossy.webp", rgb, "WEBP", quality=50)
    save("tiny.ico", rgb, "ICO")
    save("tiny.tga", rgb, "TGA")
    save("tiny.ppm", rgb, "PPM")
    save("tiny_la.png", rgb.convert("LA"), "PNG")
    save("tiny_i16.png", rgb.convert("I;16"), "PNG")


# ---------------------------------------------------------------- manifest
def manifests():
    bundle = ROOT / "target" / "tmp" / "sdk-recipe-bundle" / "moda.json"
    if bundle.is_file():
        text = bundle.read_text()
    else:
        print(f"{bundle} missing: run `cargo test -p moda-tests --test sdk` first", file=sys.stderr)
        return
    put("manifest", "bundle.json", text)
    m = json.loads(text)
    put("manifest", "compact.json", json.dumps(m, separators=(",", ":")))
    m2 = json.loads(text)
    m2["format_version"] = 2
    put("manifest", "newer.json", json.dumps(m2))
    m3 = json.loads(text)
    m3["tokenizer"] = "../tokenizer.json"
    put("manifest", "escape.json", json.dumps(m3))
    m4 = json.loads(text)
    m4["generation"]["max_new_tokens"] = 10**6
    put("manifest", "long.json", json.dumps(m4))
    put("manifest", "not_a_manifest.json", '{"format": "other"}')


# ---------------------------------------------------------------- tokenizer
def tokenizers():
    opt = FIXTURES / "tokenizer" / "tokenizer.json"
    put("tokenizer", "opt.json", opt.read_bytes())
    vocab = {"<s>": 0, "<pad>": 1, "</s>": 2, "<unk>": 3, "a": 4, "b": 5, "ab": 6, "Ġa": 7, "Ġ": 8}
    added = [
        {"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
         "normalized": False, "special": True}
        for t, i in [("<s>", 0), ("<pad>", 1), ("</s>", 2), ("<unk>", 3)]
    ]
    template = {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": "</s>", "type_id": 0}},
                   {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {"</s>": {"id": "</s>", "ids": [2], "tokens": ["</s>"]}},
    }
    models = {
        "bpe": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                "vocab": vocab, "merges": ["a b"]},
        "wordlevel": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
        "wordpiece": {"type": "WordPiece", "unk_token": "<unk>", "continuing_subword_prefix": "##",
                      "max_input_chars_per_word": 100, "vocab": vocab},
        "unigram": {"type": "Unigram", "unk_id": 3,
                    "vocab": [[t, -float(i)] for t, i in sorted(vocab.items(), key=lambda x: x[1])]},
    }
    decoders = {
        "bpe": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        "wordlevel": {"type": "Sequence", "decoders": [
            {"type": "Replace", "pattern": {"String": "▁"}, "content": " "},
            {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "wordpiece": {"type": "WordPiece", "prefix": "##", "cleanup": True},
        "unigram": {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
    }
    for name, model in models.items():
        tok = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added,
               "normalizer": None,
               "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False,
                                 "trim_offsets": True, "use_regex": True},
               "post_processor": template if name != "wordlevel" else None,
               "decoder": decoders[name], "model": model}
        put("tokenizer", f"{name}.json", json.dumps(tok))
    ctc = json.loads(json.dumps(tok))
    ctc["decoder"] = {"type": "CTC", "pad_token": "<pad>", "word_delimiter_token": "|", "cleanup": True}
    put("tokenizer", "ctc.json", json.dumps(ctc))


# ---------------------------------------------------------------- weights
def safetensors_bytes(tensors, metadata=None):
    header, data = {}, b""
    for name, (dtype, shape, raw) in tensors.items():
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [len(data), len(data) + len(raw)]}
        data += raw
    if metadata is not None:
        header["__metadata__"] = metadata
    h = json.dumps(header, separators=(",", ":")).encode()
    h += b" " * (-len(h) % 8)
    return struct.pack("<Q", len(h)) + h + data


def safetensors_seeds():
    f32 = struct.pack("<6f", 0.5, -1.0, 2.0, 3.5, -0.25, 1e-3)
    put("safetensors", "f32.safetensors",
        safetensors_bytes({"w": ("F32", [2, 3], f32), "b": ("F32", [3], f32[:12])}, {"format": "pt"}))
    put("safetensors", "dtypes.safetensors", safetensors_bytes({
        "f16": ("F16", [2, 2], struct.pack("<4e", 1.0, -2.0, 0.5, 65504.0)),
        "bf16": ("BF16", [3], b"\x80\x3f\x00\xc0\x00\x3f"),
        "f64": ("F64", [2], struct.pack("<2d", 1.5, -2.5)),
        "i64": ("I64", [2], struct.pack("<2q", 7, -9)),
        "u8": ("U8", [4], b"\x00\x7f\x80\xff"),
        "u32": ("U32", [1], struct.pack("<I", 5)),
        "scalar": ("F32", [], struct.pack("<f", 4.0)),
        "empty": ("F32", [0, 3], b""),
    }))
    proj = FIXTURES / "moda" / "projector.safetensors"
    if proj.stat().st_size <= 64 << 10:
        put("safetensors", "projector.safetensors", proj.read_bytes())


class _Storage:
    def __init__(self, cls, key, numel):
        self.cls, self.key, self.numel = cls, key, numel


class _Tensor:
    def __init__(self, storage, offset, size, stride):
        self.args = (storage, offset, tuple(size), tuple(stride), False, OrderedDict())

    def __reduce__(self):
        return (_rebuild_tensor_v2, self.args)


def _rebuild_tensor_v2(*args):
    raise NotImplementedError


class _Pickler(pickle.Pickler):
    def persistent_id(self, obj):
        if isinstance(obj, _Storage):
            return ("storage", obj.cls, obj.key, "cpu", obj.numel)
        return None


def _fake_torch():
    """Module objects under the names torch's pickles refer to, so that pickle writes
    `torch._utils._rebuild_tensor_v2` and `torch.FloatStorage` by reference."""
    torch = types.ModuleType("torch")
    utils = types.ModuleType("torch._utils")
    _rebuild_tensor_v2.__module__ = "torch._utils"
    _rebuild_tensor_v2.__qualname__ = "_rebuild_tensor_v2"
    utils._rebuild_tensor_v2 = _rebuild_tensor_v2
    classes = {}
    for name in ["FloatStorage", "HalfStorage", "BFloat16Storage", "DoubleStorage", "LongStorage",
                 "ByteStorage", "IntStorage"]:
        cls = type(name, (), {"__module__": "torch"})
        setattr(torch, name, cls)
        classes[name] = cls
    torch._utils = utils
    sys.modules["torch"] = torch
    sys.modules["torch._utils"] = utils
    return classes


def pickle_bytes(obj):
    b = io.BytesIO()
    _Pickler(b, protocol=2).dump(obj)
    return b.getvalue()


def pth_bytes(pkl, storages, prefix="archive"):
    b = io.BytesIO()
    with zipfile.ZipFile(b, "w", zipfile.ZIP_STORED) as z:
        z.writestr(f"{prefix}/data.pkl", pkl)
        z.writestr(f"{prefix}/byteorder", "little")
        for key, raw in storages.items():
            z.writestr(f"{prefix}/data/{key}", raw)
        z.writestr(f"{prefix}/version", "3\n")
    return b.getvalue()


def pth_seeds():
    c = _fake_torch()
    f = _Storage(c["FloatStorage"], "0", 6)
    h = _Storage(c["HalfStorage"], "1", 4)
    l = _Storage(c["LongStorage"], "2", 2)
    u = _Storage(c["ByteStorage"], "3", 4)
    d = _Storage(c["DoubleStorage"], "4", 2)
    storages = {
        "0": struct.pack("<6f", 0.5, -1.0, 2.0, 3.5, -0.25, 1e-3),
        "1": struct.pack("<4e", 1.0, -2.0, 0.5, 3.0),
        "2": struct.pack("<2q", 7, -9),
        "3": b"\x00\x7f\x80\xff",
        "4": struct.pack("<2d", 1.5, -2.5),
    }
    state = OrderedDict([
        ("w", _Tensor(f, 0, [2, 3], [3, 1])),
        ("wt", _Tensor(f, 0, [3, 2], [1, 3])),
        ("b", _Tensor(f, 3, [3], [1])),
        ("h", _Tensor(h, 0, [2, 2], [2, 1])),
        ("l", _Tensor(l, 0, [2], [1])),
        ("u", _Tensor(u, 0, [4], [1])),
        ("d", _Tensor(d, 0, [], [])),
    ])
    pkl = pickle_bytes(state)
    put("pth", "state.pth", pth_bytes(pkl, storages))
    put("pth", "nested.pth", pth_bytes(pickle_bytes({"state_dict": state, "epoch": 3}), storages,
                                       prefix="model"))
    # The target wraps an input that is not a zip as `archive/data.pkl` beside fixed storages
    # (see moda_tests::fuzz::pth): pickles alone reach the reader past the zip's checks.
    put("pth", "state.pkl", pkl)
    put("pth", "one.pkl", pickle_bytes({"x": _Tensor(_Storage(c["FloatStorage"], "0", 16), 0,
                                                      [4, 4], [4, 1])}))
    put("pth", "model.pkl", pickle_bytes({"model": {"y": _Tensor(u, 1, [3], [1])}}))


# ---------------------------------------------------------------- catalog CSV
def csvs():
    put("catalog_csv", "simple.csv", "id,image,caption\n1,a.jpg,Blue jeans\n2,b.png,Red shirt\n")
    put("catalog_csv", "quoted.csv",
        'image,"caption, long"\n"dir/with space.jpg","a ""quoted"" caption"\n"x\ny.jpg",z\n')
    put("catalog_csv", "ragged.csv", "image\n\n  \na.jpg,extra,cells\n/abs/b.jpg\na.jpg\n")
    put("catalog_csv", "crlf_bom.csv", "\ufeffimage,id\r\nc.jpg,1\r\n,2\r\n")
    put("catalog_csv", "other_column.csv", "path,id\na.jpg,1\n")


# ---------------------------------------------------------------- resumable output
def outputs():
    header = json.dumps({"moda_job": {"task": "describe", "shard": "0/1",
                                      "options": {"max_new_tokens": 20}, "model": "0" * 64}})
    embed_header = header.replace('"describe"', '"embed"')
    desc = json.dumps({"image": "a.jpg", "description": "Blue jeans", "token_ids": [2, 7, 8],
                       "logprobs": [-0.1, -0.2, None],
                       "timings_ms": {"preprocess": 1.0, "encoder": 2.0, "decoder": 3.0,
                                      "total": 6.0}})
    emb = json.dumps({"image": "b.jpg", "image_hex": "62ff2e6a7067", "embedding": [0.5, -0.5]})
    err = json.dumps({"image": "c.jpg", "error": "not an image"})
    # `describe --embed`: the embedding in the description's record (null for a non-finite
    # number).
    embed_options = header.replace('"max_new_tokens": 20',
                                   '"max_new_tokens": 20, "embedding": "unit"')
    desc_emb = desc[:-1] + ', "embedding": [0.6, null, -0.8]}'
    put("resumable_output", "describe.jsonl", f"{header}\n{desc}\n{err}\n")
    put("resumable_output", "describe_embed.jsonl", f"{embed_options}\n{desc_emb}\n{err}\n")
    put("resumable_output", "embed.jsonl", f"{embed_header}\n{emb}\n{err}\n")
    put("resumable_output", "truncated.jsonl", f"{header}\n{desc}\n{err[:20]}")
    put("resumable_output", "no_header.jsonl", f"{desc}\n\n{err}\n")
    put("resumable_output", "other_job.jsonl",
        header.replace('"0/1"', '"1/2"').replace("20", "30") + "\n")
    put("resumable_output", "empty", "")


def main():
    if "--clean" in sys.argv:
        shutil.rmtree(CORPUS, ignore_errors=True)
    images()
    manifests()
    tokenizers()
    safetensors_seeds()
    pth_seeds()
    csvs()
    outputs()
    for d in sorted(CORPUS.iterdir()):
        files = list(d.iterdir())
        print(f"corpus/{d.name}: {len(files)} files, {sum(f.stat().st_size for f in files)} bytes")


if __name__ == "__main__":
    main()
