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
import shlex
import sys
import time

import numpy as np

from data import world
from data.tokenizer import SPECIAL_TOKENS, Tokenizer
from ground import (UserError, die, nonnegative, positive, sigterm_stops, stop_reason,
                    writable_dir)

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_OUT = os.path.join(HERE, "cache", "world")
DEFAULTS = dict(vocab_size=4096, seed=0, val_fraction=0.02, world_copies=None,  # the options
                caps_per_copy=0)


def read_text_files(paths):
    """One document per .txt file (directories are searched recursively, in sorted order). A
    file named twice, or two files with the same text, count once: a copy could otherwise land
    on both sides of the train/validation split."""
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
    docs, seen = [], set()
    for f in files:
        with open(f, "rb") as fh:
            raw = fh.read()
        if raw in seen:
            continue
        seen.add(raw)
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{f}: line {line}: not UTF-8 text (byte {e.start}: "
                             f"{raw[e.start:e.start + 1]!r}); convert it, e.g. with "
                             "iconv") from None
        if text.strip():
            docs.append(text)
    if not docs:
        raise ValueError(f"all input files are empty: {' '.join(files)}")
    return docs, files


def pieces(doc, size=20_000):
    """Cut a long document at paragraph breaks into pieces of about `size` characters, so that
    the validation split (whole pieces) samples every source, even a single long file. A
    paragraph more than twice that long is cut at line breaks, else at spaces."""
    if len(doc) <= size:
        return [doc]
    out, cur = [], ""
    for para in doc.split("\n\n"):
        if cur and len(cur) + len(para) > size:
            out.append(cur)
            cur = ""
        cur += para + "\n\n"
    out = out + [cur] if cur.strip() else out
    return [part for piece in out for part in cut_long(piece, size)]


def cut_long(text, size):
    out = []
    while len(text) > 2 * size:  # cut after the last line break before `size`, else a space
        at = text.rfind("\n", 0, size) + 1 or text.rfind(" ", 0, size) + 1 or size
        out.append(text[:at])
        text = text[at:]
    return out + [text]


def split(docs, val_fraction):
    """(train, val) documents. Whole documents are held out where there are enough of them;
    otherwise (a single file, say) the end of the longest is, about val_fraction of all the text.
    Validation text is never training text."""
    n_val = min(round(len(docs) * val_fraction), len(docs) - 1)
    if n_val >= 1:
        return docs[n_val:], docs[:n_val]
    i = max(range(len(docs)), key=lambda j: len(docs[j]))
    doc = docs[i]
    at = int(len(doc) - val_fraction * sum(map(len, docs)))
    at = max(doc.rfind(" ", 0, at), doc.rfind("\n", 0, at)) + 1 or at  # at a word boundary
    if at <= 0 or not doc[:at].strip() or not doc[at:].strip():
        raise ValueError(f"{sum(map(len, docs))} characters of text are too few to hold out "
                         "validation text: give more text")
    return docs[:i] + [doc[:at]] + docs[i + 1:], [doc[at:]]


def content_hash(files, header=b""):
    """sha256 of the files' contents, each with its length. Contents only, never paths: the same
    data has the same hash wherever the project lives."""
    h = hashlib.sha256(header)
    for f in files:
        with open(f, "rb") as fh:
            content = fh.read()
        h.update(len(content).to_bytes(8, "little") + content)
    return h.hexdigest()


def fingerprint(options, files):
    """Hash of every option and input byte that shapes the output."""
    return content_hash(files, json.dumps(options, sort_keys=True).encode())


def command(out, inputs=None, tokenizer=None, **options):
    """The command line that prepares `out` from these arguments (for error messages)."""
    words = ["python", "-m", "data.prepare"] + (["--input", *inputs] if inputs else [])
    if os.path.abspath(out) != DEFAULT_OUT:
        words += ["--out", out]
    if tokenizer:
        words += ["--tokenizer", tokenizer]
    for name, value in options.items():
        if value != DEFAULTS[name]:
            words += ["--" + name.replace("_", "-"), str(value)]
    return shlex.join(words)


def prepare(out=DEFAULT_OUT, inputs=None, tokenizer=None, quiet=False, **options):
    """Prepare `out` from the bundled world (or from `inputs`, .txt files or folders), unless it
    is already prepared from the same inputs and options. Options: see DEFAULTS."""
    options = {**DEFAULTS, **options}
    inputs = [os.fspath(p) for p in inputs] if inputs else None  # meta.json keeps them as text
    tokenizer = os.fspath(tokenizer) if tokenizer else None
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr))
    if options["vocab_size"] < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"--vocab-size {options['vocab_size']}: at least 256 bytes + "
                         f"{len(SPECIAL_TOKENS)} special tokens = {256 + len(SPECIAL_TOKENS)}")
    if not 0 < options["val_fraction"] < 1:
        raise ValueError(f"--val-fraction {options['val_fraction']}: must lie between 0 and 1")
    if tokenizer and not os.path.isfile(tokenizer):
        why = "a folder: pass the tokenizer.json in it" if os.path.isdir(tokenizer) else \
            "no such file"
        raise ValueError(f"--tokenizer {tokenizer}: {why}")
    docs, files = read_text_files(inputs) if inputs else (None, world.source_files())
    fp = fingerprint(options, files + ([tokenizer] if tokenizer else [])
                     + [__file__, os.path.join(HERE, "tokenizer.py")])
    try:
        if check_prepared(out)["fingerprint"] == fp:
            say(f"{out} is up to date")
            return out
    except ValueError:
        pass  # not prepared, or incomplete: prepare it
    t0 = time.time()
    if docs is None:
        copies = {} if options["world_copies"] is None else {"copies": options["world_copies"]}
        docs = world.world_documents(seed=options["seed"], caps_per_copy=options["caps_per_copy"],
                                     **copies) + world.shakespeare_documents()
        say(f"generated the bundled world: {len(docs)} documents, "
            f"{sum(map(len, docs)) / 1e6:.1f} MB")
    docs = [p for d in docs for p in pieces(d)]
    random.Random(options["seed"]).shuffle(docs)
    train_docs, val_docs = split(docs, options["val_fraction"])
    if tokenizer:
        tok = Tokenizer.load(tokenizer)
    else:
        t = time.time()
        tok = Tokenizer.train(train_docs, options["vocab_size"])
        say(f"trained a {tok.n_vocab}-token BPE tokenizer in {time.time() - t:.1f}s")
    if tok.n_vocab > 2**16:
        raise ValueError(f"vocab size {tok.n_vocab} does not fit the uint16 token files "
                         "(max 65536)")
    written = write_split_files(out, tok, {"train": train_docs, "val": val_docs})
    n_docs = len(train_docs) + len(val_docs)
    n_bytes = sum(len(d.encode()) for d in train_docs + val_docs)
    n_text_tokens = written["train_tokens"] + written["val_tokens"] - n_docs  # no <|endoftext|>
    meta = dict(fingerprint=fp, arguments=dict(inputs=inputs, tokenizer=tokenizer, **options),
                source="files" if inputs else "world", **written, vocab_size=tok.n_vocab,
                tokenizer_checksum=tok.checksum, n_documents=n_docs, n_bytes=n_bytes,
                bytes_per_token=round(n_bytes / n_text_tokens, 3), seed=options["seed"],
                seconds=round(time.time() - t0, 1))
    with open(os.path.join(out, "meta.json.tmp"), "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(os.path.join(out, "meta.json.tmp"), os.path.join(out, "meta.json"))  # written
    say(f"wrote {out}: {meta['train_tokens']:,} train + {meta['val_tokens']:,} val tokens "
        f"({meta['bytes_per_token']} bytes/token) in {meta['seconds']}s")  # last: "complete"
    return out


def write_split_files(out, tok, split_docs):
    """train.bin, val.bin (every document opens with <|endoftext|>) and tokenizer.json. Returns
    the token counts and the checksum of the token files: the identity of the data."""
    os.makedirs(out, exist_ok=True)
    if os.path.exists(os.path.join(out, "meta.json")):  # incomplete until the new one is written
        os.remove(os.path.join(out, "meta.json"))
    counts = {}
    for name, docs in split_docs.items():
        ids = [[tok.eot_id] + d for d in tok.encode_batch(docs)]
        arr = np.fromiter((t for d in ids for t in d), dtype=np.uint16)
        path, tmp = os.path.join(out, f"{name}.bin"), os.path.join(out, f"{name}.bin.tmp")
        try:  # through a Python file: a full disk raises an OSError that says so
            with open(tmp, "wb") as f:
                f.write(arr.tobytes())
            os.replace(tmp, path)
        except OSError as e:
            raise OSError(e.errno, e.strerror, path) from None
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        counts[f"{name}_tokens"] = int(arr.size)
    tok.save(os.path.join(out, "tokenizer.json"))
    return dict(counts, data_checksum=tokens_checksum(out))


def tokens_checksum(data_dir):
    return content_hash([os.path.join(data_dir, name) for name in ("train.bin", "val.bin")])


def check_prepared(data_dir):
    """The one check of a prepared folder, made before it is used and before it is called up
    to date: meta.json readable, and every file it records present with the recorded size (the
    tokenizer with the recorded checksum). Returns meta.json's contents; a ValueError says what
    is wrong and the command that prepares the folder again."""
    meta_path = os.path.join(data_dir, "meta.json")
    if os.path.abspath(data_dir) == DEFAULT_OUT:
        redo = "python -m data.prepare"
    else:
        redo = f"python -m data.prepare --input YOUR_TEXT_FILES --out {shlex.quote(data_dir)}"
    if not os.path.isfile(meta_path):
        raise ValueError(f"{data_dir}: no prepared data (no meta.json); prepare it: {redo}")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
        redo = command(data_dir, **meta["arguments"])
        sizes = {f"{s}.bin": 2 * meta[f"{s}_tokens"] for s in ("train", "val")}
        tokenizer_checksum = meta["tokenizer_checksum"]
        missing = {"data_checksum", "source", "vocab_size", "fingerprint"} - meta.keys()
        if missing:  # keys the stages read
            raise KeyError(", ".join(sorted(missing)))
    except (OSError, ValueError, KeyError, TypeError, RecursionError) as e:
        raise ValueError(f"{meta_path}: unreadable, or from an older version of this project "
                         f"({type(e).__name__}: {e}); prepare it again: {redo}") from None
    for name, size in sizes.items():
        path = os.path.join(data_dir, name)
        found = os.path.getsize(path) if os.path.isfile(path) else None
        if found != size:
            what = "is missing" if found is None else f"has {found} bytes, not {size}"
            raise ValueError(f"{path} {what} (see meta.json): the folder is incomplete; prepare "
                             f"it again: {redo}")
    if tokens_checksum(data_dir) != meta["data_checksum"]:
        raise ValueError(f"{data_dir}: the token files are not the ones meta.json records "
                         f"(changed since); prepare it again: {redo}")
    tok_path = os.path.join(data_dir, "tokenizer.json")
    if not os.path.isfile(tok_path) or file_sha256(tok_path) != tokenizer_checksum:
        raise ValueError(f"{tok_path} is missing or not the tokenizer of the token files; "
                         f"prepare it again: {redo}")
    return meta


def file_sha256(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def load_tokens(data_dir, *splits):
    """Memory-map the named splits ("train", "val"), after one check_prepared: returns the
    arrays, then meta.json's contents."""
    meta = check_prepared(data_dir)
    return (*(np.memmap(os.path.join(data_dir, f"{name}.bin"), dtype=np.uint16, mode="r")
              for name in splits), meta)


def refresh(out=DEFAULT_OUT):
    """What a stage calls for the bundled world: bring `out` up to date with the arguments it was
    prepared with (the defaults when it holds none), never undoing a user's own preparation."""
    try:
        with open(os.path.join(out, "meta.json")) as f:
            arguments = json.load(f)["arguments"]
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        arguments = {}
    return prepare(out, **arguments)


@sigterm_stops()  # SIGTERM stops it as Ctrl-C does
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", metavar="PATH",
                   help="your own .txt files or folders, one document per file (default: the "
                        "bundled world)")
    p.add_argument("--out", default=DEFAULT_OUT, help="output folder (default: data/cache/world)")
    p.add_argument("--tokenizer", metavar="FILE",
                   help="reuse this tokenizer.json instead of training one (needed to continue "
                        "pretraining a checkpoint: pass its out/base/tokenizer.json)")
    p.add_argument("--vocab-size", type=positive(int), default=DEFAULTS["vocab_size"],
                   help="tokenizer size incl. 256 bytes and the special tokens (default: 4096)")
    p.add_argument("--seed", type=nonnegative(int), default=DEFAULTS["seed"],
                   help="world generation and split seed (default: 0)")
    p.add_argument("--val-fraction", type=positive(float), default=DEFAULTS["val_fraction"],
                   help="fraction of the documents held out for the validation loss; a single "
                        "document gives that fraction of its end (default: 0.02)")
    p.add_argument("--world-copies", type=positive(int), default=None,
                   help="passes the world generator makes over the fact tables (default: "
                        "world.py's own)")
    p.add_argument("--caps-per-copy", type=nonnegative(int), default=DEFAULTS["caps_per_copy"],
                   help="passages written in capital letters per pass over the tables, so the "
                        "corpus spells facts in capitals too (default: 0; README: the SFT "
                        "ablations)")
    args = p.parse_args(argv)
    try:
        if os.path.exists(os.path.join(args.out, "ckpt.pt")):  # its tokenizer.json is the run's
            raise UserError(f"--out {args.out}: a training run's folder (it holds ckpt.pt); "
                            "prepared data goes to a folder of its own")
        writable_dir(args.out, "--out")
        prepare(args.out, args.input, args.tokenizer, vocab_size=args.vocab_size, seed=args.seed,
                val_fraction=args.val_fraction, world_copies=args.world_copies,
                caps_per_copy=args.caps_per_copy)
    except (UserError, ValueError) as e:
        die(str(e))
    except (OSError, KeyboardInterrupt) as e:  # meta.json is written last: a rerun redoes the rest
        try:
            check_prepared(args.out)
            state = f"{args.out} is as it was"
        except ValueError:
            state = f"{args.out} is not prepared"
        sys.exit(f"stopped: {stop_reason(e)}; {state}")


if __name__ == "__main__":
    main()
