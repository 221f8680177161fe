#!/usr/bin/env python3
"""A byte-level BPE tokenizer of OPT-125m's size, for measurements where the hub is out of reach.

    /work/pyenv/bin/python scripts/train_bpe.py OUT.json [--vocab 50265] [--files 20000]

Trains GPT-2's kind of tokenizer (byte-level pre-tokenizer and decoder; `<s>`, `<pad>`, `</s>`,
`<unk>` as ids 0-3; the BOS `</s>` added by a TemplateProcessing post-processor, as OPT's
`tokenizer.json` has it) on text that every Rust developer machine holds: the `.md` and `.rs`
files of cargo's registry (`~/.cargo/registry/src`). The ids mean nothing, but the vocabulary
has OPT's size and the shape of a real one (words, pieces, leading-space variants), which is
what the cost of loading a tokenizer and of compiling a caption schema for it depends on
(`cargo run --release -p exporter --example random_bundle -- OUT int4 --tokenizer OUT.json`).
"""
import argparse
import glob
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--vocab", type=int, default=50265)
    ap.add_argument("--files", type=int, default=20000, help="at most this many corpus files")
    args = ap.parse_args()
    src = os.path.expanduser("~/.cargo/registry/src")
    files = sorted(glob.glob(f"{src}/*/*/**/*.md", recursive=True)
                   + glob.glob(f"{src}/*/*/src/**/*.rs", recursive=True))[: args.files]
    if not files:
        raise SystemExit(f"no .md or .rs files under {src} to train on")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A </s> $B", special_tokens=[("</s>", 2)])
    trainer = trainers.BpeTrainer(vocab_size=args.vocab, min_frequency=2, show_progress=False,
                                  special_tokens=["<s>", "<pad>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train(files, trainer)
    tmp = args.out + ".tmp"
    tok.save(tmp)
    os.replace(tmp, args.out)
    print(json.dumps({"out": args.out, "vocab": tok.get_vocab_size(), "files": len(files)}))


if __name__ == "__main__":
    main()
