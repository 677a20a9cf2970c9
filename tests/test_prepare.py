"""data/prepare.py: idempotent, reads user text, refuses bad input with a clear message."""
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from data import prepare
from data.tokenizer import Tokenizer
from tests.conftest import ROOT


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def test_user_folder_is_prepared_and_second_run_is_a_no_op(tmp_path):
    for i in range(5):
        write(tmp_path / "in" / f"{i}.txt", f"Document {i}. " + "The quick brown fox. " * 300)
    out = tmp_path / "out"
    prepare.prepare(str(out), inputs=[str(tmp_path / "in")], vocab_size=300, quiet=True)
    meta = json.load(open(out / "meta.json"))
    train, _ = prepare.load_tokens(str(out), "train")
    assert meta["source"] == "files" and len(train) == meta["train_tokens"]
    assert train[0] == meta["vocab_size"] - 6  # every document opens with <|endoftext|>
    stamp = os.path.getmtime(out / "train.bin")
    prepare.prepare(str(out), inputs=[str(tmp_path / "in")], vocab_size=300, quiet=True)
    assert os.path.getmtime(out / "train.bin") == stamp
    write(tmp_path / "in" / "5.txt", "a new file changes the fingerprint " * 50)
    prepare.prepare(str(out), inputs=[str(tmp_path / "in")], vocab_size=300, quiet=True)
    assert json.load(open(out / "meta.json"))["fingerprint"] != meta["fingerprint"]


def test_one_long_file_still_gets_a_validation_split(tmp_path):
    write(tmp_path / "book.txt", "\n\n".join(f"Paragraph {i}. " + "words " * 200
                                             for i in range(200)))
    out = tmp_path / "out"
    prepare.prepare(str(out), inputs=[str(tmp_path / "book.txt")], vocab_size=300, quiet=True)
    meta = json.load(open(out / "meta.json"))
    assert meta["val_tokens"] > 0 and meta["train_tokens"] > 10 * meta["val_tokens"]


def test_non_utf8_file_names_file_and_line(tmp_path):
    (tmp_path / "bad.txt").write_bytes(b"fine line\nsecond line \xff\xfe here\n")
    with pytest.raises(ValueError, match=r"bad.txt: line 2: not UTF-8"):
        prepare.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "bad.txt")], quiet=True)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("setup,message", [
    (lambda p: None, "no such file or directory"),
    (lambda p: p.mkdir(), "no .txt files found"),
    (lambda p: (p.mkdir(), (p / "e.txt").write_text("  \n")), "all input files are empty"),
])
def test_missing_or_empty_input(tmp_path, setup, message):
    setup(tmp_path / "in")
    with pytest.raises(ValueError, match=message):
        prepare.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "in")], quiet=True)


@pytest.mark.parametrize("damage", ["delete val.bin", "truncate train.bin", "change train.bin",
                                    "delete tokenizer.json", "delete meta.json"])
def test_the_command_an_incomplete_folder_suggests_repairs_it(tmp_path, damage):
    """The check that refuses a folder is the one that decides it is up to date, and the command
    its error names prepares this folder again (it never says "up to date" and changes nothing)."""
    for i in range(4):
        write(tmp_path / "in" / f"{i}.txt", f"Document {i}. " + "The quick brown fox. " * 300)
    out = tmp_path / "out"
    args = ["--input", str(tmp_path / "in"), "--out", str(out), "--vocab-size", "300"]
    subprocess.run([sys.executable, "-m", "data.prepare", *args], check=True, cwd=ROOT,
                   capture_output=True)
    meta = json.loads((out / "meta.json").read_text())
    action, name = damage.split()
    if action == "delete":
        os.remove(out / name)
    elif action == "truncate":
        with open(out / name, "r+b") as f:
            f.truncate(10)
    else:  # same size, one token id changed
        arr = np.fromfile(out / name, dtype=np.uint16)
        arr[5] = (arr[5] + 1) % meta["vocab_size"]
        arr.tofile(out / name)
    with pytest.raises(ValueError, match="prepare it") as e:
        prepare.load_tokens(str(out), "train")
    suggested = str(e.value).split("prepare it again: ")[-1].split("prepare it: ")[-1]
    if damage == "delete meta.json":  # nothing left that says how: the user's inputs are asked for
        assert "--input YOUR_TEXT_FILES --out " + str(out) in suggested
        suggested = suggested.replace("YOUR_TEXT_FILES", str(tmp_path / "in")) + " --vocab-size 300"
    else:
        assert suggested == shlex.join(["python", "-m", "data.prepare", *args])
    run = subprocess.run([sys.executable, *shlex.split(suggested)[1:]], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0 and "up to date" not in run.stderr
    train, repaired = prepare.load_tokens(str(out), "train")
    assert repaired["data_checksum"] == meta["data_checksum"]  # the same data as before


def test_the_same_inputs_elsewhere_give_the_same_fingerprint(tmp_path):
    """A moved or re-cloned project: paths differ, contents do not, and neither do the
    fingerprint and the checksum a checkpoint records."""
    for where in ("a", "b"):
        for i in range(3):
            write(tmp_path / where / "in" / f"{i}.txt", f"Doc {i}. " + "Some words here. " * 200)
        prepare.prepare(str(tmp_path / where / "out"), inputs=[str(tmp_path / where / "in")],
                        vocab_size=300, quiet=True)
    a, b = (json.loads((tmp_path / w / "out" / "meta.json").read_text()) for w in ("a", "b"))
    assert a["fingerprint"] == b["fingerprint"] and a["data_checksum"] == b["data_checksum"]


@pytest.mark.parametrize("text", ["word " * 4000, "a short file without a paragraph break.\n",
                                  "\n\n".join(["Some words. " * 800] * 3)])  # cut in 2 pieces
def test_a_single_document_is_split_never_copied(tmp_path, text):
    write(tmp_path / "one.txt", text)
    out = tmp_path / "out"
    prepare.prepare(str(out), inputs=[str(tmp_path / "one.txt")], vocab_size=300, quiet=True)
    train, meta = prepare.load_tokens(str(out), "train")
    val, _ = prepare.load_tokens(str(out), "val")
    tok = Tokenizer.load(out / "tokenizer.json")
    train_text, val_text = (tok.decode([t for t in map(int, s) if t != tok.eot_id])
                            for s in (train, val))
    # nothing repeated, nothing lost (pieces of a long text end with a paragraph break: +2)
    assert len(train_text) + len(val_text) - len(text) in (0, 2)
    assert val_text in text and 0 < len(val_text) <= max(0.05 * len(text), 30)  # ~2%, not half
    n_docs = int((train == tok.eot_id).sum() + (val == tok.eot_id).sum())  # <|endoftext|> each
    n_bytes = len((train_text + val_text).encode())
    assert meta["bytes_per_token"] == round(n_bytes / (len(train) + len(val) - n_docs), 3)


def test_a_document_too_short_to_split_is_refused(tmp_path):
    write(tmp_path / "one.txt", "x")
    with pytest.raises(ValueError, match="too few to hold out validation text"):
        prepare.prepare(str(tmp_path / "out"), inputs=[str(tmp_path / "one.txt")], quiet=True)


@pytest.mark.parametrize("args,message", [
    (["--tokenizer", "/nonexistent/tokenizer.json"], "--tokenizer /nonexistent/tokenizer.json: "
                                                     "no such file"),
    (["--out", "{file}"], "--out {file}: is a file, not a folder"),
    (["--out", "{file}/sub"], "--out {file}/sub: cannot write there"),
    (["--val-fraction", "1"], "--val-fraction 1.0: must lie between 0 and 1"),
    (["--out", "{run}"], "--out {run}: a training run's folder (it holds ckpt.pt)"),
])
def test_cli_mistakes_get_one_line_naming_the_flag(tmp_path, args, message):
    write(tmp_path / "in" / "a.txt", "Some text. " * 100)
    (tmp_path / "file").write_text("not a folder")
    write(tmp_path / "run" / "ckpt.pt", "a checkpoint")  # its tokenizer.json must stay the run's
    args = [x.format(file=tmp_path / "file", run=tmp_path / "run") for x in args]
    message = message.replace("{run}", str(tmp_path / "run"))
    run = subprocess.run([sys.executable, "-m", "data.prepare", "--input", str(tmp_path / "in"),
                          "--out", str(tmp_path / "out"), *args], cwd=ROOT, capture_output=True,
                         text=True)
    assert run.returncode == 2
    assert run.stderr.startswith(f"error: {message.format(file=tmp_path / 'file')}")
    assert run.stderr.count("\n") == 1


def test_a_file_given_twice_counts_once(tmp_path):
    for i in range(3):
        write(tmp_path / "in" / f"{i}.txt", f"Document {i}. " + "Words of the day. " * 300)
    out = tmp_path / "out"
    prepare.prepare(str(out), inputs=[str(tmp_path / "in"), str(tmp_path / "in" / "0.txt")],
                    vocab_size=300, quiet=True)
    assert json.loads((out / "meta.json").read_text())["n_documents"] == 3 + 1  # + the cut one


def test_refresh_keeps_the_options_a_folder_was_prepared_with(tmp_path):
    write(tmp_path / "in" / "a.txt", "Some text here. " * 500)
    out = str(tmp_path / "out")
    prepare.prepare(out, inputs=[str(tmp_path / "in")], vocab_size=300, seed=3, quiet=True)
    stamp = os.path.getmtime(os.path.join(out, "train.bin"))
    prepare.refresh(out)  # what a stage calls: the user's preparation is up to date as it is
    assert os.path.getmtime(os.path.join(out, "train.bin")) == stamp
    assert json.loads(open(os.path.join(out, "meta.json")).read())["seed"] == 3
