"""pretrain.py: the loss falls, --resume continues the same curve, DDP equals one process."""
import json
import math
import os
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest
import torch

import pretrain
import training
from data import chats, prepare, world
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


@pytest.mark.parametrize("optimizer", ["adamw", "muon"])
def test_resume_continues_the_same_curve(small_data, tmp_path, optimizer):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = FAST + ["--data", small_data, "--steps", "24", "--eval-every", "8",
                   "--optimizer", optimizer]
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


@pytest.mark.parametrize("saved,given", [("adamw", "muon"), ("muon", "adamw")])
def test_resume_with_another_optimizer_is_refused(small_data, tmp_path, capsys, saved, given):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "4", "--stop-at", "2",
                          "--optimizer", saved])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with pytest.raises(SystemExit) as e:
        pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--resume", "--optimizer",
                              given])
    assert e.value.code == 2
    assert "resume with the --optimizer it was saved with" in capsys.readouterr().err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_nan_loss_stops_and_keeps_last_checkpoint(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "4", "--stop-at", "2"])
    before = open(os.path.join(out, "ckpt.pt"), "rb").read()
    with pytest.raises(SystemExit) as e:  # an absurd learning rate blows the loss up to inf/nan
        pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--resume", "--lr", "1e9"])
    assert e.value.code == 1 and "last good checkpoint is intact" in capsys.readouterr().err
    assert open(os.path.join(out, "ckpt.pt"), "rb").read() == before


def test_weights_that_give_non_finite_logits_are_never_checkpointed():
    """The loss checked at each step comes before the update; check_weights runs before every
    checkpoint on the updated weights."""
    from model import GPT, GPTConfig
    from training import check_weights
    model = GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_kv_head=2,
                          n_embd=16))
    x = torch.randint(0, 50, (2, 8))
    check_weights(model, x, 7)
    with torch.no_grad():
        model.layers[0].mlp.up_proj.weight[0, 0] = float("inf")
    with pytest.raises(FloatingPointError, match="weights after step 7 give non-finite logits"):
        check_weights(model, x, 7)


def test_data_from_another_tokenizer_is_refused_with_a_command_that_works(small_data, tmp_path,
                                                                         capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "2"])
    (tmp_path / "t.txt").write_text("a completely different corpus " * 2000)
    other = str(tmp_path / "other")
    prepare.prepare(other, inputs=[str(tmp_path / "t.txt")], vocab_size=300, quiet=True)
    args = FAST + ["--data", other, "--out-dir", str(tmp_path / "x"), "--init-from", out,
                   "--steps", "2"]
    with pytest.raises(SystemExit):
        pretrain.main(args)
    err = capsys.readouterr().err.splitlines()[-1]
    assert f"{other} was tokenized with another tokenizer than {out}'s" in err
    before = json.loads((tmp_path / "other" / "meta.json").read_text())
    new_dir = err.split("then pass --data ")[1].split(":")[0]
    suggested = shlex.split(err.split(f"--data {new_dir}: ")[1])
    subprocess.run([sys.executable, *suggested[1:]], cwd=ROOT, check=True, capture_output=True)
    pretrain.main(args[:args.index("--data")] + ["--data", new_dir]
                  + args[args.index("--data") + 2:])  # the advice was right
    assert json.loads((tmp_path / "other" / "meta.json").read_text()) == before  # not overwritten


def test_cli_contract_tiny_preset_end_to_end(tmp_path):
    """The documented command: prepares the bundled world if needed, trains, writes eval.json."""
    out = tmp_path / "tiny"
    subprocess.run([sys.executable, "pretrain.py", "--preset", "tiny", "--out-dir", str(out)],
                   check=True, cwd=ROOT, capture_output=True, timeout=600)
    ev = json.load(open(out / "eval.json"))
    from data.tokenizer import Tokenizer
    n_vocab = Tokenizer.load(str(out / "tokenizer.json")).n_vocab
    assert ev["val_loss"] < math.log(n_vocab) - 2  # far better than a uniform guess
    assert ev["zero_shot_n"] == 100  # every bare question fits the context of 128
    assert ev["fewshot_capital_n"] > 150 and ev["fewshot_symbol_n"] == 118
    for kind, n in (("zero_shot_question", "zero_shot_n"), ("fewshot_capital_accuracy",
                                                           "fewshot_capital_n"),
                    ("fewshot_symbol_accuracy", "fewshot_symbol_n")):
        rate = ev[kind if kind.endswith("accuracy") else kind + "_rate"]
        hits = rate * ev[n]  # a rate is a count of prompts over the prompts asked
        assert 0 <= rate <= 1 and abs(hits - round(hits)) < 1e-6, kind
    assert len(ev["zero_shot_examples"]) == 3
    audit = json.load(open(out / "knowledge.json"))  # the held-out facts it knows: none, yet
    assert audit["n"] == ev["knowledge_audit"]["n"] == len(audit["facts"]) == len(
        chats.facts("heldout"))
    assert audit["known"] == sum(f["known"] for f in audit["facts"]) < 10


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


def ctrl_c(args, once_exists, after=0.0, sig=signal.SIGINT):
    """Run ARGS, press Ctrl-C (or send `sig`) once the file ONCE_EXISTS exists (and AFTER more
    seconds); return the exit status and stderr. A shell may start background jobs with SIGINT
    ignored (then Python never raises KeyboardInterrupt): the child gets the default, as from a
    terminal."""
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, preexec_fn=lambda: signal.signal(signal.SIGINT,
                                                                        signal.SIG_DFL))
    deadline = time.time() + 120
    while not once_exists.exists():
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.1)
    time.sleep(after)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    return proc.returncode, err


@pytest.mark.parametrize("sig,says", [(signal.SIGINT, "interrupted"),
                                      (signal.SIGTERM, "terminated (SIGTERM)")])
def test_ctrl_c_keeps_the_last_checkpoint_and_resume_goes_on(small_data, tmp_path, sig, says):
    out = tmp_path / "base"
    args = [sys.executable, "pretrain.py", *FAST, "--data", small_data, "--out-dir", str(out),
            "--steps", "100000", "--eval-every", "5"]
    returncode, err = ctrl_c(args, once_exists=out / "ckpt.pt", after=1.0, sig=sig)
    assert returncode == 1
    assert f"stopped: {says}" in err and "last good checkpoint is intact" in err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step > 0
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
    (tmp_path / "t.txt").write_text("The same tokenizer, another corpus. " * 2000)
    other = str(tmp_path / "other")  # same tokenizer, other text
    prepare.prepare(other, inputs=[str(tmp_path / "t.txt")],
                    tokenizer=os.path.join(small_data, "tokenizer.json"), quiet=True)
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", other, "--out-dir", out, "--resume"])
    assert f"does not hold the tokens the run in {out} was trained on ({small_data}," in \
        capsys.readouterr().err
    pretrain.main(FAST + ["--out-dir", out, "--resume"])  # without --data: the run's own
    assert sorted(losses(out)) == [1, 2, 3, 4]


def test_a_moved_run_resumes_on_the_same_curve(small_data, tmp_path):
    """mv of the project (its data and checkpoints) or a fresh clone with the same data."""
    args = FAST + ["--steps", "12", "--eval-every", "4"]
    pretrain.main(args + ["--data", small_data, "--out-dir", str(tmp_path / "a")])
    old = tmp_path / "old"
    shutil.copytree(small_data, old / "data")
    pretrain.main(args + ["--data", str(old / "data"), "--out-dir", str(old / "base"),
                          "--stop-at", "8"])
    shutil.move(old, tmp_path / "new")
    new = tmp_path / "new"
    pretrain.main(args + ["--data", str(new / "data"), "--out-dir", str(new / "base"), "--resume"])
    assert losses(new / "base")[12] == pytest.approx(losses(tmp_path / "a")[12], rel=1e-5)


def test_grad_clip_zero_means_no_clipping_and_negative_is_refused(small_data, tmp_path, capsys):
    runs = {}
    for clip in ("0", "1e9", "0.1"):  # 1e9 never clips; 0.1 always does at these gradients
        out = str(tmp_path / clip)
        pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "10",
                              "--warmup", "2", "--grad-clip", clip])
        runs[clip] = losses(out)
    assert runs["0"] == runs["1e9"] and runs["0"] != runs["0.1"]
    assert runs["0"][10] < runs["0"][1] - 0.5  # it trains
    with pytest.raises(SystemExit) as e:
        pretrain.main(FAST + ["--data", small_data, "--out-dir", str(tmp_path / "x"),
                              "--grad-clip", "-1"])
    assert e.value.code == 2 and "--grad-clip: must be 0 or more" in capsys.readouterr().err


def test_ctrl_c_before_the_first_checkpoint_says_nothing_was_saved(small_data, tmp_path, capsys):
    out = tmp_path / "base"
    args = [sys.executable, "pretrain.py", *FAST, "--data", small_data, "--out-dir", str(out),
            "--steps", "100000", "--eval-every", "100000"]
    returncode, err = ctrl_c(args, once_exists=out / "log.jsonl")  # step 1 is logged
    assert returncode == 1 and not (out / "ckpt.pt").exists()
    assert f"stopped: interrupted. No checkpoint was saved in {out} yet" in err
    assert "intact" not in err
    with pytest.raises(SystemExit) as e:
        pretrain.main(args[2:] + ["--resume"])
    assert e.value.code == 2
    assert f"--resume: no checkpoint in {out} to continue" in capsys.readouterr().err
    pretrain.main(args[2:] + ["--stop-at", "3"])  # the same command starts over
    assert sorted(losses(out)) == [1, 2, 3]


def interrupt_when(condition):
    """A thread that sends this process a real SIGINT (Ctrl-C) once condition() holds."""
    def watch():
        while not condition():
            time.sleep(0.01)
        os.kill(os.getpid(), signal.SIGINT)
    threading.Thread(target=watch, daemon=True).start()


def test_a_checkpoint_comes_every_minute_between_evaluations(small_data, tmp_path, monkeypatch,
                                                             capsys):
    monkeypatch.setattr(training, "SAVE_EVERY_SECONDS", 0)  # a "minute" passes at every step
    out = tmp_path / "base"
    args = FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "100000",
                   "--eval-every", "100000"]
    interrupt_when(lambda: (out / "log.jsonl").exists() and
                   len((out / "log.jsonl").read_text().splitlines()) >= 3)
    with pytest.raises(SystemExit):
        pretrain.main(args)
    assert "stopped: interrupted. The last good checkpoint is intact" in capsys.readouterr().err
    step = torch.load(out / "ckpt.pt", weights_only=True)["step"]
    assert step >= 2  # no evaluation yet, and still (nearly) nothing lost
    pretrain.main(args + ["--resume", "--stop-at", str(step + 2)])
    assert sorted(losses(out)) == list(range(1, step + 3))


def test_ctrl_c_during_the_final_evaluation_stops_cleanly(tmp_path, monkeypatch, capsys):
    """The behaviour evaluation runs on the bundled world; Ctrl-C there stops like Ctrl-C in
    training, and --resume runs the evaluation again."""
    prepare.prepare(prepare.DEFAULT_OUT, quiet=True)
    evaluate = pretrain.evaluate_base

    def interrupted(*args, **kw):
        os.kill(os.getpid(), signal.SIGINT)  # a real Ctrl-C, delivered inside the evaluation
        return evaluate(*args, **kw)
    monkeypatch.setattr(pretrain, "evaluate_base", interrupted)
    out = tmp_path / "base"
    args = ["--preset", "tiny", "--device", "cpu", "--out-dir", str(out), "--steps", "2",
            "--eval-iters", "1"]
    with pytest.raises(SystemExit):
        pretrain.main(args)
    assert "stopped: interrupted. The last good checkpoint is intact" in capsys.readouterr().err
    assert not (out / "eval.json").exists()
    monkeypatch.setattr(pretrain, "evaluate_base", evaluate)
    pretrain.main(args + ["--resume"])
    assert "fewshot_capital_accuracy" in json.loads((out / "eval.json").read_text())


def test_a_full_disk_while_checkpointing_keeps_the_last_checkpoint(small_data, tmp_path):
    out = tmp_path / "base"
    args = [sys.executable, "pretrain.py", *FAST, "--data", small_data, "--out-dir", str(out),
            "--steps", "8", "--eval-every", "4"]
    subprocess.run(args + ["--stop-at", "4"], cwd=ROOT, check=True, capture_output=True)
    before = (out / "ckpt.pt").read_bytes()
    limit = len(before) // 2  # the next checkpoint cannot be written: as if the disk were full
    run = subprocess.run(args + ["--resume"], cwd=ROOT, capture_output=True, text=True,
                         preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE,
                                                               (limit, limit)))
    assert run.returncode == 1 and "Traceback" not in run.stderr
    assert run.stderr.splitlines()[-1] == (f"stopped: {out / 'ckpt.pt'}: File too large. The last "
                                           f"good checkpoint is intact: {out / 'ckpt.pt'} "
                                           "(--resume continues from it)")
    assert (out / "ckpt.pt").read_bytes() == before
    assert sorted(os.listdir(out)) == ["ckpt.pt", "log.jsonl", "tokenizer.json"]  # no temp file


def test_a_log_line_cut_short_by_a_crash_does_not_stop_resume(small_data, tmp_path):
    out = tmp_path / "base"
    args = FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "8", "--eval-every", "4"]
    pretrain.main(args + ["--stop-at", "4"])
    with open(out / "log.jsonl", "a") as f:
        f.write('{"step": 5, "lo')
    pretrain.main(args + ["--resume"])
    assert sorted(losses(out)) == list(range(1, 9))


@pytest.mark.parametrize("args,message", [
    (["--data", "/nonexistent/data"], "no prepared data"),
    (["--eval-every", "0"], "must be positive"),
    (["--lr", "nan"], "--lr: must be positive"),
    (["--out-dir", "{file}"], "--out-dir {file}: is a file, not a folder"),
    (["--out-dir", "{file}/sub"], "--out-dir {file}/sub: cannot write there"),
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--device", "tpu9"], "--device tpu9: not a device this project runs on"),
    (["--n-head", "3"], "model shape: n_embd 64 is not a multiple of n_head 3"),
    (["--n-kv-head", "3"], "model shape: n_head 2 is not a multiple of n_kv_head 3"),
    (["--resume"], "--resume: no checkpoint in"),
    (["--init-from", "/nonexistent/base"], "--init-from /nonexistent/base: no checkpoint there"),
])
def test_bad_arguments_get_one_line(small_data, tmp_path, capsys, args, message):
    (tmp_path / "file").write_text("not a folder")
    args = [x.format(file=tmp_path / "file") for x in args]
    with pytest.raises(SystemExit) as e:
        pretrain.main(FAST + ["--data", small_data, "--out-dir", str(tmp_path / "x"), *args])
    assert e.value.code == 2
    err = capsys.readouterr().err
    last = err.splitlines()[-1]  # argparse's own errors come after its usage lines
    assert message.format(file=tmp_path / "file") in last and "Traceback" not in err, err


def test_init_from_with_another_shape_is_refused(small_data, tmp_path, capsys):
    base = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", base, "--steps", "1"])
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", small_data, "--out-dir", str(tmp_path / "x"),
                              "--init-from", base, "--n-layer", "3"])
    assert "--n-layer 3 differs from" in capsys.readouterr().err


def test_a_checkpoint_from_an_older_version_loads_but_does_not_resume(small_data, tmp_path, capsys):
    out = tmp_path / "base"
    pretrain.main(FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "4",
                          "--stop-at", "2"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    del ckpt["resume_format"]  # as the previous version wrote it
    torch.save(ckpt, out / "ckpt.pt")
    with pytest.raises(SystemExit):
        pretrain.main(FAST + ["--data", small_data, "--out-dir", str(out), "--resume"])
    assert "saved by an older version of this project: its weights load" in capsys.readouterr().err
    pretrain.main(FAST + ["--data", small_data, "--out-dir", str(tmp_path / "new"),
                          "--init-from", str(out), "--steps", "1"])


def test_resume_keeps_the_runs_preset(small_data, tmp_path, capsys):
    out = str(tmp_path / "base")
    pretrain.main(FAST + ["--data", small_data, "--out-dir", out, "--steps", "4", "--stop-at", "2"])
    with pytest.raises(SystemExit):
        pretrain.main(FAST[2:] + ["--preset", "cpu", "--out-dir", out, "--resume"])
    assert "--preset cpu: the run being resumed is a 'tiny' run" in capsys.readouterr().err


def test_a_short_context_skips_evaluation_prompts_it_cannot_hold(tmp_path):
    prepare.prepare(prepare.DEFAULT_OUT, quiet=True)
    out = tmp_path / "base"
    pretrain.main(["--preset", "tiny", "--device", "cpu", "--out-dir", str(out), "--steps", "2",
                   "--eval-iters", "1", "--block-size", "24"])
    ev = json.loads((out / "eval.json").read_text())
    assert ev["zero_shot_n"] < 100 and ev["fewshot_capital_n"] == 0  # skipped, and counted


def test_code_shaped_says_whether_a_continuation_is_a_function():
    from evaluation import code_shaped
    assert code_shaped("javascript", "\n  let t = 0;\n  return t;\n}\n\nfunction next() {")
    assert not code_shaped("javascript", "\n  return t;\n", ended=True)  # never closed
    assert not code_shaped("javascript", "\nThe capital of France is Paris.\n}")
    assert not code_shaped("javascript", "\n  total = 1;\n}")  # returns nothing
    assert code_shaped("python", "\n    '''Sum.'''\n    return 1\n\n\ndef g():")
    assert code_shaped("python", "\n    return 1\n", ended=True)
    assert not code_shaped("python", "\n  return 1\n\ndef g():")  # indented by 2
    assert not code_shaped("python", "\n    return 1")  # the function never ends
    assert not code_shaped("python", " What is the capital of France?\nWhat")


def test_the_code_eval_signatures_are_never_in_the_corpus():
    import random
    from data import code
    text = "\n".join(code.code_documents(random.Random("code:0"), 2000))
    names = [s.split("(")[0].split()[-1] for sigs in code.EVAL_SIGNATURES.values() for s in sigs]
    assert len(names) == 24 and not [n for n in names if n in text]
    assert "function calculateTax(" in text or "def calculate_tax(" in text  # the article's


def test_a_refused_run_leaves_its_folder_as_it_found_it(small_data, tmp_path, capsys):
    old = tmp_path / "old"
    old.mkdir()
    (old / "eval.json").write_text('{"kept": true}\n')
    (old / "log.jsonl").write_text('{"step": 1}\n')
    bad = FAST + ["--data", small_data, "--batch-size", "10", "--micro-batch", "4"]
    for out in (old, tmp_path / "new"):
        with pytest.raises(SystemExit) as e:
            pretrain.main(bad + ["--out-dir", str(out)])
        assert e.value.code == 2 and "--batch-size" in capsys.readouterr().err
    assert sorted(os.listdir(old)) == ["eval.json", "log.jsonl"]
    assert (old / "eval.json").read_text() == '{"kept": true}\n'
    assert not (tmp_path / "new").exists()  # no empty folder left behind


def test_a_second_run_into_a_busy_folder_is_refused_and_a_stale_lock_taken_over(
        small_data, tmp_path, capsys):
    out = tmp_path / "base"
    out.mkdir()
    hold = ("import fcntl, os, sys, time; fd = os.open(sys.argv[1], os.O_CREAT | os.O_RDWR); "
            "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('held', "
            "flush=True); time.sleep(60)")  # another run's lock, as run_lock takes it
    holder = subprocess.Popen([sys.executable, "-c", hold, str(out / "run.lock")],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "held\n"
        with pytest.raises(SystemExit) as e:
            pretrain.main(FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "2"])
        assert e.value.code == 2
        assert f"another run (process {holder.pid}) is writing there" in capsys.readouterr().err
        assert os.listdir(out) == ["run.lock"]  # nothing else touched
    finally:
        holder.kill()
        holder.wait()
    assert (out / "run.lock").exists()  # left by a killed holder: the kernel freed its lock
    pretrain.main(FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "2"])
    assert (out / "ckpt.pt").exists() and not (out / "run.lock").exists()  # taken, then freed
