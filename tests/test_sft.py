"""sft.py: the loss mask really masks, the loss falls, the model learns to stop; bad input."""
import json
import os
import shutil

import pytest
import torch

import sft
from checkpoints import load_checkpoint
from data import chats, prepare
from evaluation import answer


@pytest.fixture(scope="session")
def base(tiny_base):
    return tiny_base


@pytest.fixture(scope="session")
def tuned(tiny_sft):
    return tiny_sft


CHAT = [{"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris"},
        {"role": "user", "content": "And of Italy?"},
        {"role": "assistant", "content": "Rome."}]


def test_targets_are_the_assistant_tokens_only(base):
    _, tok, _ = load_checkpoint(base)
    (x, y), = sft.encode(tok, [CHAT], 128)[0]
    ids, mask = tok.render_chat(CHAT)
    assert x == ids[:-1]
    assert [t for t in y if t != -1] == [t for t, m in zip(ids, mask) if m]
    assert tok.decode([t for t in y if t != -1]) == " Paris<|end|> Rome.<|end|>"


def test_loss_has_no_gradient_outside_the_mask(base):
    model, tok, _ = load_checkpoint(base)
    short = CHAT[:3]
    examples, _ = sft.encode(tok, [CHAT, short], 128)
    x, y = sft.collate(examples, tok.pad_id, "cpu")
    logits, _ = model(x)
    logits.retain_grad()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten(), ignore_index=-1,
                                             reduction="sum")
    loss.backward()
    grad_norm = logits.grad.norm(dim=-1)  # (B, T): a position contributes iff its grad is nonzero
    assert torch.equal(grad_norm > 0, y != -1)  # prompt, role markers and padding: exactly zero
    # and the loss equals the hand-computed mean over assistant tokens
    logp = logits.log_softmax(-1)
    sel = y != -1
    manual = -logp[sel].gather(-1, y[sel][:, None]).sum()
    assert torch.allclose(sft.masked_loss_sum(model, x, y), manual, rtol=1e-5)


def test_changing_prompt_side_targets_changes_nothing(base):
    """Targets outside the mask are ignored: swap them for anything, loss and grads stay."""
    model, tok, _ = load_checkpoint(base)
    (x, y), = sft.encode(tok, [CHAT], 128)[0]
    ids, mask = tok.render_chat(CHAT)
    x = torch.tensor([x])
    raw = torch.tensor([ids[1:]])
    keep = torch.tensor([mask[1:]]).bool()
    other = torch.where(keep, raw, torch.randint(0, 200, raw.shape))  # new prompt-side targets
    grads = []
    for targets in (torch.where(keep, raw, -1), torch.where(keep, other, -1)):
        model.zero_grad()
        loss = sft.masked_loss_sum(model, x, targets)
        loss.backward()
        grads.append((loss.item(), model.lm_head.weight.grad.clone()))
    assert grads[0][0] == grads[1][0] and torch.equal(grads[0][1], grads[1][1])


def test_tiny_sft_loss_falls_and_model_stops_with_end_of_turn(base, tuned):
    log = [json.loads(line) for line in open(os.path.join(tuned, "log.jsonl"))]
    first = sum(r["loss"] for r in log[:5]) / 5
    last = sum(r["loss"] for r in log[-5:]) / 5
    assert last < first * 0.6, (first, last)
    assert all(0 < r["grad_norm"] < float("inf") and r["tok_per_s"] > 0 for r in log)
    model, tok, ckpt = load_checkpoint(tuned, ["sft"])
    items = chats.eval_prompts("heldout")[:64]
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    results = answer(model, tok, prompts)
    # the bundled chats vary their wordings, claims and scope: one tiny epoch ends 85-90%
    assert sum(ended for _, ended, _ in results) / len(results) >= 0.8
    base_model, _, _ = load_checkpoint(base)
    base_results = answer(base_model, tok, prompts)
    assert sum(ended for _, ended, _ in base_results) / len(results) < 0.5


def test_user_jsonl_messages_and_alpaca(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n\n" + json.dumps(
        {"instruction": "Name a colour.", "input": "", "output": "Blue."}) + "\n" + json.dumps(
        {"instruction": "Translate", "input": "chat", "output": "cat"}) + "\n")
    convs = sft.read_jsonl(str(path))
    assert convs[0] == CHAT
    assert convs[1] == [{"role": "user", "content": "Name a colour."},
                        {"role": "assistant", "content": "Blue."}]
    assert convs[2][0]["content"] == "Translate\n\nchat"


@pytest.mark.parametrize("line,message", [
    ("{not json", "d.jsonl:2: not valid JSON"),
    ('{"prompt": "x"}', "d.jsonl:2: expected a 'messages' field"),
    ('{"instruction": "x"}', "d.jsonl:2: field 'output' missing"),
    ('{"instruction": "x", "output": " "}', "d.jsonl:2: field 'output' missing, empty"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]}',
     "d.jsonl:2: field 'messages': message 1: expected an assistant turn"),
    ('{"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]}',
     "d.jsonl:2: field 'messages': message 1 \\(assistant\\): empty"),
])
def test_bad_jsonl_rows_name_file_line_and_field(tmp_path, line, message):
    path = tmp_path / "d.jsonl"
    path.write_text(json.dumps({"messages": CHAT}) + "\n" + line + "\n")
    with pytest.raises(sft.UserError, match=message):
        sft.read_jsonl(str(path))


def test_non_utf8_jsonl_names_the_line(tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_bytes(json.dumps({"messages": CHAT}).encode() + b"\n{\"instruction\": \"\xff\"}\n")
    with pytest.raises(sft.UserError, match="d.jsonl:2: not UTF-8"):
        sft.read_jsonl(str(path))


def test_too_long_conversations_are_left_out(base):
    _, tok, _ = load_checkpoint(base)
    long = [{"role": "user", "content": "word " * 400}, {"role": "assistant", "content": "ok"}]
    examples, dropped = sft.encode(tok, [CHAT, long], 128)
    assert len(examples) == 1 and dropped == 1


def test_an_unusable_out_dir_is_one_line(base, tmp_path, capsys):
    (tmp_path / "file").write_text("not a folder")
    for out, message in ((tmp_path / "file", "is a file, not a folder"),
                         (base, "the --init-from folder")):  # never advice to delete the base
        with pytest.raises(SystemExit) as e:
            sft.main(["--init-from", base, "--out-dir", str(out), "--device", "cpu",
                      "--replay", "0"])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: --out-dir {out}: {message}") and err.count("\n") == 1


def test_a_context_too_short_for_the_evaluation_fails_before_training(small_data, tmp_path,
                                                                       capsys):
    import pretrain
    short = str(tmp_path / "short")
    pretrain.main(["--preset", "tiny", "--device", "cpu", "--no-behaviour-eval", "--data",
                   small_data, "--out-dir", short, "--steps", "1", "--block-size", "24"])
    with pytest.raises(SystemExit):
        sft.main(["--preset", "tiny", "--device", "cpu", "--init-from", short, "--out-dir",
                  str(tmp_path / "sft")])
    assert "the evaluation prompts need a context of more than" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "sft" / "log.jsonl")  # nothing was trained


def test_wrong_stage_and_missing_base(tuned, tmp_path, capsys):
    with pytest.raises(SystemExit):
        sft.main(["--init-from", tuned, "--out-dir", str(tmp_path / "x"), "--device", "cpu"])
    assert "is a 'sft' checkpoint; expected base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        sft.main(["--init-from", str(tmp_path / "nope"), "--out-dir", str(tmp_path / "y")])
    assert "--init-from " + str(tmp_path / "nope") + ": no checkpoint there" in \
        capsys.readouterr().err


def test_resume_continues_the_same_curve(base, small_data, tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", base, "--no-behaviour-eval",
            "--eval-every", "4", "--replay", "4", "--replay-data", small_data]
    sft.main(args + ["--out-dir", a, "--stop-at", "12"])
    sft.main(args + ["--out-dir", b, "--stop-at", "8"])
    sft.main(args + ["--out-dir", b, "--resume", "--stop-at", "12"])
    la = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(a, "log.jsonl")))}
    lb = {r["step"]: r["loss"] for r in map(json.loads, open(os.path.join(b, "log.jsonl")))}
    assert sorted(lb) == list(range(1, 13))
    for step in (9, 12):
        assert lb[step] == pytest.approx(la[step], rel=1e-5)


def test_sample_compare_and_chat_mode(base, tuned, capsys, monkeypatch):
    import io
    import sample
    sample.main(["--compare", base, tuned, "--prompt", "What is the capital of France?",
                 "--system", "Answer in one word.", "--temperature", "0", "--device", "cpu",
                 "--max-new-tokens", "20"])
    out = capsys.readouterr().out
    assert f"=== {base} (base model, prompted as plain text) ===" in out
    assert f"=== {tuned} (sft model, prompted as chat) ===" in out
    # the base model sees the request as text (and echoes it); the chat model only answers
    base_part, chat_part = out.split(f"=== {tuned}")
    assert "Answer in one word.\nWhat is the capital of France?\n" in base_part
    assert "What is the capital of France?" not in chat_part
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of Japan?\nAnd of Peru?\n"))
    sample.main(["--ckpt", tuned, "--interactive", "--temperature", "0", "--device", "cpu"])
    assert capsys.readouterr().out.count("you> ") == 3  # two turns, then end of input
    # a conversation longer than the context forgets its oldest exchanges instead of failing
    turns = "".join(f"Tell me the capital of country number {i}, please.\n" for i in range(8))
    monkeypatch.setattr("sys.stdin", io.StringIO(turns))
    sample.main(["--ckpt", tuned, "--interactive", "--system", "Answer in one word.",
                 "--device", "cpu", "--seed", "0", "--max-new-tokens", "20"])
    captured = capsys.readouterr()
    assert captured.out.count("you> ") == 9 and "error" not in captured.err
    assert "the oldest exchange is forgotten" in captured.err


def test_checkpoint_with_a_swapped_tokenizer_is_refused(base, tmp_path, capsys):
    import shutil
    from data.tokenizer import Tokenizer
    other = tmp_path / "other"
    shutil.copytree(base, other)
    Tokenizer.train(["some other text entirely"] * 50, 300).save(other / "tokenizer.json")
    with pytest.raises(SystemExit):
        sft.main(["--init-from", str(other), "--out-dir", str(tmp_path / "x"), "--device", "cpu"])
    assert "does not match the tokenizer" in capsys.readouterr().err


def test_replay_data_must_match_the_tokenizer(base, tmp_path, capsys):
    with pytest.raises(SystemExit):  # the bundled world's tokenizer is not the test base's
        sft.main(["--preset", "tiny", "--device", "cpu", "--init-from", base, "--replay", "4",
                  "--out-dir", str(tmp_path / "x")])
    assert "was not tokenized with the tokenizer of the model" in capsys.readouterr().err


def test_two_process_torchrun_matches_one_process(base, small_data, tmp_path):
    from tests.conftest import torchrun
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", base, "--no-behaviour-eval",
            "--replay", "4", "--replay-data", small_data, "--batch-size", "8", "--micro-batch", "4",
            "--stop-at", "4"]
    sft.main(args + ["--out-dir", str(tmp_path / "one")])
    torchrun("sft.py", args + ["--out-dir", str(tmp_path / "two")])
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in ("one", "two")]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for one, two in zip(*logs):
        assert two["loss"] == pytest.approx(one["loss"], rel=1e-4)
        assert two["replay_loss"] == pytest.approx(one["replay_loss"], rel=1e-4)


def short_chat(i):
    return {"messages": [{"role": "user", "content": f"Say {i}."},
                         {"role": "assistant", "content": f"{i}."}]}


@pytest.mark.parametrize("first,n_chats,why", [
    ("long", 20, "all 1 held-out conversations are longer than the context"),
    ("short", 1, "a single conversation leaves none to hold out"),
])
def test_validation_loss_is_missing_never_zero(base, tmp_path, capsys, first, n_chats, why):
    """When no held-out conversation can be scored, val_loss is null with the counts, never a
    perfect 0.0; and the training conversations never stand in for held-out ones."""
    rows = [short_chat(i) for i in range(n_chats)]
    if first == "long":  # the first 5% (here: one) are held out
        rows[0]["messages"][0]["content"] = "word " * 400
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "sft"
    sft.main(["--preset", "tiny", "--device", "cpu", "--init-from", base, "--data", str(path),
              "--out-dir", str(out), "--batch-size", "1", "--micro-batch", "1", "--replay", "0",
              "--eval-every", "1"])
    assert f"note: val_loss is not measured: {why}" in capsys.readouterr().err
    ev = json.loads((out / "eval.json").read_text())
    assert ev["val_loss"] is None and ev["val_conversations"] == 0
    assert ev["val_left_out_too_long"] == (1 if first == "long" else 0)
    assert all(r["val_loss"] is None for r in map(json.loads, open(out / "log.jsonl")))


def test_a_moved_run_resumes_with_its_paths_given_again(base, small_data, tmp_path, capsys):
    """Stored paths survive a move: the bundled world is never stored as a path, and a user's
    path that moved is asked for by its flag, then checked to be the same data."""
    args = ["--preset", "tiny", "--device", "cpu", "--no-behaviour-eval", "--eval-every", "4",
            "--replay", "4", "--batch-size", "4", "--micro-batch", "4"]
    old = tmp_path / "old"
    shutil.copytree(small_data, old / "replay")
    (old / "chats.jsonl").write_text("".join(json.dumps(short_chat(i)) + "\n" for i in range(40)))
    sft.main(args + ["--init-from", base, "--replay-data", str(old / "replay"), "--data",
                     str(old / "chats.jsonl"), "--out-dir", str(old / "sft"), "--stop-at", "4"])
    shutil.move(old, tmp_path / "new")
    new = tmp_path / "new"
    with pytest.raises(SystemExit):
        sft.main(args + ["--out-dir", str(new / "sft"), "--resume"])
    assert f"--data {old / 'chats.jsonl'}: not found; the run in" in capsys.readouterr().err
    sft.main(args + ["--out-dir", str(new / "sft"), "--resume", "--data", str(new / "chats.jsonl"),
                     "--replay-data", str(new / "replay")])
    assert json.loads((new / "sft" / "eval.json").read_text())["steps"] > 4
    (tmp_path / "t.txt").write_text("Another corpus, the same tokenizer. " * 3000)
    other = str(tmp_path / "other")
    prepare.prepare(other, inputs=[str(tmp_path / "t.txt")],
                    tokenizer=os.path.join(small_data, "tokenizer.json"), quiet=True)
    (tmp_path / "changed.jsonl").write_text("".join(json.dumps(short_chat(i + 1)) + "\n"
                                                    for i in range(40)))
    for flag, path, message in (("--replay-data", other, "is not the data the run in"),
                                ("--data", str(tmp_path / "changed.jsonl"), "the chats differ")):
        given = {"--data": str(new / "chats.jsonl"), "--replay-data": str(new / "replay"),
                 flag: path}  # one of the two is other data, whatever its path
        with pytest.raises(SystemExit):
            sft.main(args + ["--out-dir", str(new / "sft"), "--resume", "--stop-at", "6",
                             *[w for kv in given.items() for w in kv]])
        assert message in capsys.readouterr().err


def test_the_bundled_defaults_are_stored_as_defaults_not_as_paths(base, tmp_path):
    from tests.conftest import ROOT
    sft.main(["--preset", "tiny", "--device", "cpu", "--init-from", base, "--out-dir",
              str(tmp_path), "--no-behaviour-eval", "--replay", "0", "--stop-at", "1"])
    config = torch.load(tmp_path / "ckpt.pt", weights_only=True)["config"]
    assert config["data"] is None and config["replay_data"] is None
    assert not any(ROOT in str(v) for v in config.values())  # nothing breaks when it moves


def test_grad_clip_zero_means_no_clipping(base, small_data, tmp_path):
    logs = {}
    for clip in ("0", "1e9", "0.01"):
        out = tmp_path / clip
        sft.main(["--preset", "tiny", "--device", "cpu", "--init-from", base, "--out-dir",
                  str(out), "--no-behaviour-eval", "--replay", "0", "--stop-at", "3",
                  "--grad-clip", clip])
        logs[clip] = [r["loss"] for r in map(json.loads, open(out / "log.jsonl"))]
    assert logs["0"] == logs["1e9"] != logs["0.01"]
