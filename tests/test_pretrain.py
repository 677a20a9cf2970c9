"""pretrain.py: the loss falls, --resume continues the same curve, DDP equals one process."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

import pretrain
from data import prepare, world
from tests.conftest import ROOT, torchrun

FAST = ["--preset", "tiny", "--device", "cpu", "--no-behaviour-eval", "--eval-iters", "2"]


def losses(out_dir):
    with open(os.path.join(out_dir, "log.jsonl")) as f:
        return {r["step"]: r["loss"] for r in map(json.loads, f)}


def test_tiny_preset_loss_falls(small_data, tmp_path):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "80"])
    curve = losses(out)
    first, last = curve[1], sum(curve[s] for s in range(71, 81)) / 10
    assert last < first - 1.5, (first, last)
    ev = json.load(open(os.path.join(out, "eval.json")))
    assert ev["stage"] == "base" and ev["val_loss"] < first - 1.0
    assert os.path.exists(os.path.join(out, "ckpt.pt"))
    assert os.path.exists(os.path.join(out, "tokenizer.json"))


def test_resume_continues_the_same_curve(small_data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = FAST + ["--data", small_data, "--steps", "24", "--eval-every", "8"]
    pretrain.main(args + ["--out-dir", a])
    pretrain.main(args + ["--out-dir", b, "--stop-at", "16"])
    assert not os.path.exists(os.path.join(b, "eval.json"))  # stopped, not finished
    pretrain.main(args + ["--out-dir", b, "--resume"])
    la, lb = losses(a), losses(b)
    assert sorted(lb) == list(range(1, 25))
    for step in (17, 20, 24):
        assert lb[step] == pytest.approx(la[step], rel=1e-5), step


def test_two_process_torchrun_matches_one_process(small_data, tmp_path):
    args = FAST + ["--data", small_data, "--steps", "6", "--batch-size", "8", "--micro-batch", "4"]
    pretrain.main(args + ["--out-dir", str(tmp_path / "one")])
    torchrun("pretrain.py", args + ["--out-dir", str(tmp_path / "two")])
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == list(range(1, 7))
    for step in one:
        assert two[step] == pytest.approx(one[step], rel=1e-4), step


def test_resume_with_another_shape_is_refused(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "4", "--stop-at", "2"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--resume", "--n-embd", "32"])
    assert "--n-embd 32 differs from the checkpoint" in capsys.readouterr().err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_nan_loss_stops_and_keeps_last_checkpoint(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "4", "--stop-at", "2"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with pytest.raises(SystemExit) as e:  # an absurd learning rate blows the loss up to inf/nan
        pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--resume", "--lr", "1e9"])
    assert "last good checkpoint is intact" in str(e.value)
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_data_from_another_tokenizer_is_refused(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "2"])
    other = tmp_path / "other"
    shutil.copytree(small_data, other)
    (tmp_path / "t.txt").write_text("a completely different corpus " * 2000)
    prepare.prepare(str(other), inputs=[str(tmp_path / "t.txt")], vocab_size=300, quiet=True)
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", str(other), "--out-dir", str(tmp_path / "x"),
                              "--init-from", out])
    assert "different tokenizer" in capsys.readouterr().err


def test_cli_contract_tiny_preset_end_to_end(tmp_path):
    """The documented command: prepares the bundled world if needed, trains, writes eval.json."""
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "pretrain.py", "--preset", "tiny", "--out-dir", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=600)
    ev = json.load(open(out / "eval.json"))
    for key in ("val_loss", "zero_shot_question_rate", "fewshot_capital_accuracy",
                "fewshot_symbol_accuracy"):
        assert 0 <= ev[key] < 10, key
    assert ev["fewshot_capital_n"] > 150 and ev["fewshot_symbol_n"] == 118


def test_init_from_continues_pretraining_on_user_text(small_data, tmp_path):
    base = tmp_path / "base"
    pretrain.main(FAST + ["--data", small_data, "--out-dir", str(base), "--steps", "60"])
    src = tmp_path / "mine"
    src.mkdir()
    for i, doc in enumerate(world.world_documents(seed=5, copies=1)[:200]):
        (src / f"{i}.txt").write_text(doc)
    mine = str(tmp_path / "mine_data")
    prepare.prepare(mine, inputs=[str(src)], tokenizer=str(base / "tokenizer.json"), quiet=True)
    expert, fresh = str(tmp_path / "expert"), str(tmp_path / "fresh")
    pretrain.main(FAST + ["--data", mine, "--out-dir", expert, "--init-from", str(base),
                          "--steps", "3"])
    pretrain.main(FAST + ["--data", mine, "--out-dir", fresh, "--steps", "3"])
    assert losses(expert)[1] < losses(fresh)[1] - 1.0  # it starts from what the base model knows


def test_ctrl_c_keeps_the_last_checkpoint_and_resume_goes_on(small_data, tmp_path):
    out = tmp_path / "base"
    args = [sys.executable, "pretrain.py", *FAST, "--data", small_data, "--out-dir", str(out),
            "--steps", "100000", "--eval-every", "5"]
    # a shell may start background jobs with SIGINT ignored (then Python never raises
    # KeyboardInterrupt); give the child the default disposition, as a terminal would
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_DFL))
    deadline = time.time() + 120
    while not (out / "ckpt.pt").exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(1.0)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    assert "stopped: interrupted" in err and "last good checkpoint is intact" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step > 0 and step % 5 == 0
    pretrain.main(FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "100000",
                          "--resume", "--stop-at", str(step + 5)])
    steps = [json.loads(line)["step"] for line in open(out / "log.jsonl")]
    assert steps == list(range(1, step + 6))  # the steps after the checkpoint were redone once


def test_fresh_run_never_overwrites_a_checkpoint(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "2"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "2"])
    assert "pass --resume" in capsys.readouterr().err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_resume_on_other_data_is_refused(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "4", "--stop-at", "2"])
    other = tmp_path / "other"
    shutil.copytree(small_data, other)
    meta = json.load(open(other / "meta.json"))
    meta["fingerprint"] = "0" * 64  # same tokenizer, other corpus
    json.dump(meta, open(other / "meta.json", "w"))
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", str(other), "--out-dir", out, "--resume"])
    assert "is not the data the run" in capsys.readouterr().err


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/data"], "no prepared data"),
    (["--eval-every", "0"], "must be positive"),
])
def test_bad_arguments_get_one_line(small_data, tmp_path, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        pretrain.main(FAST + ["--data", small_data, "--out-dir", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_init_from_with_another_shape_is_refused(small_data, tmp_path, capsys):
    base = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", base, "--steps", "1"])
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", small_data, "--out-dir", str(tmp_path / "x"),
                              "--init-from", base, "--n-layer", "3"])
    assert "--n-layer 3 differs from" in capsys.readouterr().err
