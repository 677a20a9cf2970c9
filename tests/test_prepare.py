"""data/prepare.py: idempotent, reads user text, refuses bad input with a clear message."""
import json
import os

import numpy as np
import pytest

from data import prepare


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


def test_token_file_that_does_not_match_is_refused(small_data, tmp_path):
    import shutil
    bad = tmp_path / "bad"
    shutil.copytree(small_data, bad)
    arr = np.fromfile(bad / "val.bin", dtype=np.uint16)
    arr[:10].tofile(bad / "val.bin")  # truncated: no longer the file meta.json describes
    with pytest.raises(ValueError, match="does not belong to this dataset"):
        prepare.load_tokens(str(bad), "val")
    arr = np.fromfile(bad / "train.bin", dtype=np.uint16)
    arr[5] = 60000  # an id the tokenizer does not have
    arr.tofile(bad / "train.bin")
    with pytest.raises(ValueError, match="vocab size"):
        prepare.load_tokens(str(bad), "train")
