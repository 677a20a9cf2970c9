"""Turn text into the token files pretrain.py memory-maps.

By default the corpus is the bundled world: generated encyclopedic passages, quiz sheets and
answer keys about real countries, elements and US states (data/world.py) plus the works of
Shakespeare. With --input it is your own .txt files (one document per file) instead.

Writes to --out: tokenizer.json (trained here, or reused with --tokenizer), train.bin and
val.bin (uint16 token ids; every document starts with <|endoftext|>) and meta.json. Running it
again with the same inputs does nothing: meta.json records a fingerprint of everything that
went in, so a second run is instant.

    python -m data.prepare                          # the bundled world -> data/cache/world
    python -m data.prepare --input notes/ --out data/cache/notes --tokenizer out/base/tokenizer.json
"""
import argparse
import hashlib
import json
import os
import random
import sys
import time

import numpy as np

from data import world
from data.tokenizer import Tokenizer

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "cache", "world")


def read_text_files(paths):
    """One document per .txt file (directories are searched recursively, in sorted order)."""
    files = []
    for p in paths:
        if os.path.isdir(p):
            files += sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs
                            if f.endswith(".txt"))
        elif os.path.isfile(p):
            files.append(p)
        else:
            raise ValueError(f"{p}: no such file or directory")
    if not files:
        raise ValueError(f"no .txt files found in {' '.join(paths)}")
    docs = []
    for f in files:
        raw = open(f, "rb").read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{f}: line {line}: not UTF-8 text (byte {e.start}: "
                             f"{raw[e.start:e.start + 1]!r}); convert it, e.g. with iconv") from None
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"all input files are empty: {' '.join(files)}")
    return docs, files


def pieces(doc, size=20_000):
    """Cut a long document at paragraph breaks into pieces of about `size` characters, so that
    the validation split (whole pieces) samples every source, even a single long file."""
    if len(doc) <= size:
        return [doc]
    out, cur = [], ""
    for para in doc.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur += para + "\n\n"
    return out + [cur] if cur.strip() else out


def fingerprint(args, files):
    """Hash of every input byte and option that shapes the output."""
    h = hashlib.sha256(json.dumps([args.vocab_size, args.seed, args.val_fraction,
                                   args.world_copies]).encode())
    for f in files:
        h.update(f.encode())
        h.update(open(f, "rb").read())
    return h.hexdigest()


def prepare(out=DEFAULT_OUT, inputs=None, tokenizer=None, vocab_size=4096, seed=0,
            val_fraction=0.02, world_copies=None, quiet=False):
    args = argparse.Namespace(vocab_size=vocab_size, seed=seed, val_fraction=val_fraction,
                              world_copies=world_copies)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if inputs:
        docs, files = read_text_files(inputs)
    else:
        docs, files = None, world.source_files()
    if tokenizer:
        files = files + [tokenizer]
    fp = fingerprint(args, files + [__file__, os.path.join(HERE, "tokenizer.py")])
    meta_path = os.path.join(out, "meta.json")
    if os.path.exists(meta_path) and json.load(open(meta_path)).get("fingerprint") == fp:
        say(f"{out} is up to date")
        return out
    t0 = time.time()
    if docs is None:
        kw = {} if world_copies is None else {"copies": world_copies}
        docs = world.world_documents(seed=seed, **kw) + world.shakespeare_documents()
        say(f"generated the bundled world: {len(docs)} documents, "
            f"{sum(map(len, docs)) / 1e6:.1f} MB")
    docs = [p for d in docs for p in pieces(d)]
    random.Random(seed).shuffle(docs)
    n_val = max(1, round(len(docs) * val_fraction)) if len(docs) > 1 else 0
    val_docs, train_docs = docs[:n_val], docs[n_val:]
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    else:
        t = time.time()
        tok = Tokenizer.train(train_docs, vocab_size)
        say(f"trained a {tok.n_vocab}-token BPE tokenizer in {time.time() - t:.1f}s")
    if tok.n_vocab > 2**16:
        raise ValueError(f"vocab size {tok.n_vocab} does not fit the uint16 token files (max 65536)")
    os.makedirs(out, exist_ok=True)
    if os.path.exists(meta_path):  # from here until the new meta.json, the folder is incomplete
        os.remove(meta_path)
    counts = {}
    for split, split_docs in (("train", train_docs), ("val", val_docs or train_docs[-1:])):
        ids = [[tok.eot_id] + d for d in tok.encode_batch(split_docs)]
        arr = np.fromiter((t for d in ids for t in d), dtype=np.uint16)
        tmp = os.path.join(out, f"{split}.bin.tmp")
        arr.tofile(tmp)
        os.replace(tmp, os.path.join(out, f"{split}.bin"))
        counts[split] = int(arr.size)
    tok.save(os.path.join(out, "tokenizer.json"))
    n_bytes = sum(len(d.encode()) for d in docs)
    meta = dict(fingerprint=fp, source="files" if inputs else "world",
                inputs=[os.path.abspath(p) for p in inputs or []], vocab_size=tok.n_vocab,
                tokenizer_checksum=tok.checksum, n_documents=len(docs), n_bytes=n_bytes,
                train_tokens=counts["train"], val_tokens=counts["val"],
                bytes_per_token=round(n_bytes / (counts["train"] + counts["val"]), 3),
                seed=seed, seconds=round(time.time() - t0, 1))
    with open(meta_path + ".tmp", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(meta_path + ".tmp", meta_path)  # written last: its presence means "complete"
    say(f"wrote {out}: {counts['train']:,} train + {counts['val']:,} val tokens "
        f"({meta['bytes_per_token']} bytes/token) in {meta['seconds']}s")
    return out


def load_tokens(data_dir, split):
    """Memory-map one split, checking it against meta.json and tokenizer.json."""
    meta_path, path = os.path.join(data_dir, "meta.json"), os.path.join(data_dir, f"{split}.bin")
    if not os.path.isfile(meta_path) or not os.path.isfile(path):
        raise ValueError(f"{data_dir}: no prepared data (run: python -m data.prepare --out "
                         f"{data_dir})")
    meta = json.load(open(meta_path))
    size = os.path.getsize(path)
    expected = meta[f"{split}_tokens"]
    if size != 2 * expected:
        raise ValueError(f"{path}: {size} bytes, but meta.json says {expected} uint16 tokens; "
                         "the token file does not belong to this dataset (prepare it again)")
    data = np.memmap(path, dtype=np.uint16, mode="r")
    if data.size and int(data.max()) >= meta["vocab_size"]:
        raise ValueError(f"{path}: token id {int(data.max())} >= vocab size "
                         f"{meta['vocab_size']} of {data_dir}/tokenizer.json")
    return data, meta


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="your own .txt files or folders, one document per file (default: the "
                        "bundled world)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: %(default)s)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="reuse this tokenizer.json instead of training one (needed to continue "
                        "pretraining a checkpoint: pass its out/base/tokenizer.json)")
    p.add_argument("--vocab-size", type=int, default=4096,
                   help="tokenizer size incl. 256 bytes and the special tokens (default: 4096)")
    p.add_argument("--seed", type=int, default=0, help="world generation and split seed")
    p.add_argument("--val-fraction", type=float, default=0.02,
                   help="fraction of documents held out for validation loss (default: 0.02)")
    p.add_argument("--world-copies", type=int, default=None,
                   help="passes the world generator makes over the fact tables (default: "
                        "world.py's own)")
    a = p.parse_args()
    try:
        prepare(a.out, a.input, a.tokenizer, a.vocab_size, a.seed, a.val_fraction, a.world_copies)
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
