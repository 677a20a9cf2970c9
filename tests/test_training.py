"""The shared plumbing (cli.py, training.py, checkpoints.py, ground.py): settings and presets, the
learning-rate schedule, the weight-decay split, the optimizer step with its gradient norm, fp16
loss scaling, fused AdamW."""
import dataclasses
import json
import math
import os
import re

import pytest
import torch

import pretrain
import reward
import sft
from cli import resolve_settings
from model import GPT, GPTConfig
from training import Process, lr_at, make_optimizer, optimizer_step

CPU = Process(rank=0, world_size=1, device="cpu", dtype=torch.float32)


def tiny_model(seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=50, block_size=16, n_layer=1, n_head=2, n_kv_head=2,
                         n_embd=16))


def backward(model, scaler=None, seed=1):
    x = torch.randint(0, 50, (4, 12), generator=torch.Generator().manual_seed(seed))
    _, loss = model(x[:, :-1], x[:, 1:])
    (scaler.scale(loss) if scaler else loss).backward()


# ----------------------------------------------------------------------------- settings
def help_text(module, argv, capsys):
    with pytest.raises(SystemExit) as e:
        module.parse_args(argv + ["--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())  # argparse wraps lines: undo it


@pytest.mark.parametrize("module, preset, flag, default", [
    (pretrain, "gpu", "--n-layer N_LAYER transformer blocks", 8),
    (pretrain, "tiny", "--steps STEPS optimizer steps in the whole schedule", 150),
    (pretrain, "cpu", "--lr LR peak learning rate", 0.002),
    (sft, "gpu", "--replay REPLAY pretraining sequences replayed per step", 32),
    (sft, "tiny", "--epochs EPOCHS passes over the training chats", 1),
    (reward, "cpu", "--epochs EPOCHS passes over the comparisons (InstructGPT: one; a second "
                    "overfits: 66% held-out accuracy", 1),  # a % in the text, shown as written
])
def test_help_shows_the_real_default_of_the_chosen_preset(module, preset, flag, default, capsys):
    text = help_text(module, ["--preset", preset], capsys)
    within_the_flag = r"(?:(?! --).)*?"  # up to the next flag
    assert re.search(re.escape(flag) + within_the_flag + re.escape(f"(default: {default})"),
                     text), text
    assert "default from the preset" not in text


def test_a_mistake_in_the_preset_flags_gets_the_full_usage(capsys):
    with pytest.raises(SystemExit) as e:
        pretrain.parse_args(["--preset"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "--n-layer N_LAYER" in err
    assert "--preset: expected one argument" in err


def test_auto_preset_follows_the_chosen_device_not_the_machine(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # as on a machine with a GPU
    a = pretrain.parse_args(["--device", "cpu"])
    assert resolve_settings(pretrain.Settings, pretrain.PRESETS, a, "cpu").preset == "cpu"
    assert resolve_settings(pretrain.Settings, pretrain.PRESETS, a, "cuda:1").preset == "gpu"
    assert "(defaults shown: the cpu preset)" in help_text(pretrain, ["--device", "cpu"], capsys)


def test_flags_override_the_preset_and_a_resumed_run_keeps_its_own():
    a = pretrain.parse_args(["--preset", "tiny", "--lr", "0.01"])
    s = resolve_settings(pretrain.Settings, pretrain.PRESETS, a, "cpu")
    assert (s.preset, s.lr, s.n_layer, s.weight_decay) == ("tiny", 0.01, 2, 0.1)
    saved = {**vars(s), "steps": 77}
    again = resolve_settings(pretrain.Settings, pretrain.PRESETS, pretrain.parse_args([]), "cpu",
                             saved)
    assert again.steps == 77 and again.lr == 0.01  # not the cpu preset's values


# ----------------------------------------------------------------------------- schedule, decay
def test_lr_schedule_warms_up_linearly_then_decays_to_a_tenth():
    lr, warmup, steps = 1e-3, 10, 110
    assert [lr_at(s, lr, warmup, steps) for s in (0, 4, 9)] == pytest.approx([1e-4, 5e-4, 1e-3])
    assert lr_at(10, lr, warmup, steps) == pytest.approx(lr)  # the peak
    assert lr_at(60, lr, warmup, steps) == pytest.approx(lr * 0.55)  # half way down the cosine
    assert lr_at(110, lr, warmup, steps) == pytest.approx(lr / 10)  # the floor
    assert lr_at(500, lr, warmup, steps) == pytest.approx(lr / 10)  # and it stays there
    after = [lr_at(s, lr, warmup, steps) for s in range(10, 111)]
    assert all(a >= b for a, b in zip(after, after[1:]))
    assert lr_at(0, lr, 0, steps) == pytest.approx(lr)  # no warmup: the peak at once


def test_weight_decay_shrinks_matrices_and_never_norm_gains():
    model = tiny_model()
    opt, scaler = make_optimizer(model, lr=0.1, weight_decay=0.5, proc=CPU)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)  # no gradient: only the decay moves a weight
    opt.step()
    for name, p in model.named_parameters():
        if "norm" in name:
            assert torch.equal(p, before[name]), name
        else:
            torch.testing.assert_close(p, before[name] * (1 - 0.1 * 0.5))
    assert any("norm" in n for n, _ in model.named_parameters())


# ----------------------------------------------------------------------------- the step
def test_optimizer_step_returns_the_gradient_norm_before_clipping():
    model = tiny_model()
    opt, scaler = make_optimizer(model, lr=1e-3, weight_decay=0.0, proc=CPU)
    backward(model)
    by_hand = torch.cat([p.grad.flatten() for p in model.parameters()]).norm().item()
    assert by_hand > 1e-3
    assert optimizer_step(opt, scaler, model, 1e-3, grad_clip=1e-3) == pytest.approx(by_hand)
    assert all(p.grad is None for p in model.parameters())  # zeroed for the next step
    assert opt.param_groups[0]["lr"] == 1e-3


def test_fp16_loss_scaling_unscales_the_norm_and_skips_an_overflowing_step():
    fp16 = Process(0, 1, "cpu", torch.float16)
    model = tiny_model()
    opt, scaler = make_optimizer(model, lr=1e-3, weight_decay=0.0, proc=fp16)
    assert scaler.is_enabled() and scaler.get_scale() == 2.0 ** 16
    reference = tiny_model()
    backward(reference)
    by_hand = torch.cat([p.grad.flatten() for p in reference.parameters()]).norm().item()
    backward(model, scaler)  # gradients 65536 times too large, until unscaled
    assert optimizer_step(opt, scaler, model, 1e-3, 1.0) == pytest.approx(by_hand, rel=1e-4)
    weights = {k: v.clone() for k, v in model.state_dict().items()}
    backward(model, scaler)
    model.lm_head.weight.grad[0, 0] = float("inf")  # an fp16 overflow
    assert math.isinf(optimizer_step(opt, scaler, model, 1e-3, 1.0))
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())  # skipped
    assert scaler.get_scale() == 2.0 ** 15  # and the scale backs off


def test_fused_adamw_matches_the_plain_one():
    models = [tiny_model(), tiny_model()]
    opts = [make_optimizer(m, 1e-2, 0.1, CPU, fused=fused)[0]
            for m, fused in zip(models, (True, False))]
    assert opts[0].param_groups[0]["fused"] and not opts[1].param_groups[0]["fused"]
    for step in range(5):
        for model, opt in zip(models, opts):
            backward(model, seed=step)
            opt.step()
            opt.zero_grad()
    for a, b in zip(*(m.parameters() for m in models)):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
    assert not torch.equal(models[0].lm_head.weight, tiny_model().lm_head.weight)  # it trained


def test_muon_orthogonalises_the_layers_matrices_and_leaves_the_rest_to_adamw():
    models = [tiny_model(), tiny_model()]
    muon, _ = make_optimizer(models[0], lr=1e-2, weight_decay=0.0, proc=CPU, muon=True)
    adamw, _ = make_optimizer(models[1], lr=1e-2, weight_decay=0.0, proc=CPU)
    hidden = {id(p) for p in models[0].layers.parameters() if p.dim() == 2}
    assert {id(p) for group in muon.muon.param_groups for p in group["params"]} == hidden
    assert sum(len(g["params"]) for g in muon.param_groups) == len(list(models[0].parameters()))
    before = [p.detach().clone() for p in models[0].parameters()]
    for model, opt in zip(models, (muon, adamw)):
        backward(model)
        opt.step()
    for (name, p), q, p0 in zip(models[0].named_parameters(), models[1].parameters(), before):
        if id(p) not in hidden:  # embeddings, head, norm gains: AdamW's step exactly
            torch.testing.assert_close(p, q, msg=name)
            continue
        update = (p0 - p).detach() / (1e-2 * 0.2 * max(p.shape) ** 0.5)  # match_rms_adamw
        gradient = torch.linalg.svdvals(p.grad)
        signal = gradient > 0.05 * gradient.max()  # directions the gradient has at all
        singular = torch.linalg.svdvals(update)[signal]
        assert gradient[signal].max() > 3 * gradient[signal].min(), name  # spread: a real test
        assert singular.min() > 0.5 and singular.max() < 1.3, (name, singular)  # all near 1


def test_every_step_logs_its_gradient_norm(small_data, tmp_path):
    out = tmp_path / "base"
    pretrain.main(["--preset", "tiny", "--device", "cpu", "--no-behaviour-eval", "--data",
                   small_data, "--out-dir", str(out), "--steps", "5", "--eval-iters", "1"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2, 3, 4, 5]
    assert all(0 < r["grad_norm"] < math.inf and r["tok_per_s"] > 0 for r in log)


COMMANDS = ["pretrain", "sft", "reward", "ppo", "dpo", "grpo", "sample", "serve", "plot", "export",
            "bench", "data.prepare", "experiments.sycophancy", "experiments.overoptimization",
            "experiments.domain_expert", "experiments.compare_rl", "tests.browser_check"]


@pytest.mark.parametrize("name", COMMANDS)
def test_every_command_has_a_help_that_shows_each_default_once(name, capsys):
    """--help of every command exits 0, and no option shows a default twice or an empty one;
    a stage shows each setting's real default."""
    import importlib
    module = importlib.import_module(name)
    with pytest.raises(SystemExit) as e:
        module.main(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    options = re.split(r"\n  (?=-)", out.split("options:", 1)[1])  # one block per option
    for option in options:
        text = " ".join(option.split())
        assert text.count("(default:") <= 1 and "(default: )" not in text, text
    settings = getattr(module, "Settings", None)
    for field in dataclasses.fields(settings) if settings else []:
        if "why" in field.metadata and getattr(settings(), field.name) not in (None, ""):
            flag = "--" + field.name.replace("_", "-") + " "
            block = " ".join(next(opt for opt in options if opt.startswith(flag)).split())
            assert "(default: " in block, block


# ----------------------------------------------------------------------------- loading
def nan_copy(folder, tmp_path):
    """A copy of a run's folder whose checkpoint has one NaN weight."""
    import shutil
    copy = tmp_path / ("nan-" + os.path.basename(folder))
    shutil.copytree(folder, copy)
    ckpt = torch.load(copy / "ckpt.pt", weights_only=True)
    next(iter(ckpt["model"].values()))[0, 0] = float("nan")
    torch.save(ckpt, copy / "ckpt.pt")
    return str(copy)


@pytest.mark.parametrize("entry", ["sample", "serve", "export", "ppo --init-from",
                                   "ppo --reward-model"])
def test_a_checkpoint_with_weights_that_are_not_finite_is_refused_by_every_entry_point(
        entry, tiny_sft, tiny_reward, tmp_path, capsys):
    import export
    import ppo
    import sample
    import serve
    sft_dir, reward_dir = tiny_sft, tiny_reward
    if entry == "ppo --reward-model":
        reward_dir = bad = nan_copy(tiny_reward, tmp_path)
    else:
        sft_dir = bad = nan_copy(tiny_sft, tmp_path)
    commands = {
        "sample": lambda: sample.main(["--ckpt", bad, "--prompt", "hi", "--device", "cpu"]),
        "serve": lambda: serve.main([bad, "--port", "0", "--device", "cpu"]),
        "export": lambda: export.main([bad, str(tmp_path / "hf")]),
        "ppo --init-from": lambda: ppo.main(["--preset", "tiny", "--init-from", sft_dir,
                                             "--reward-model", reward_dir, "--out-dir",
                                             str(tmp_path / "ppo"), "--device", "cpu"]),
    }
    commands["ppo --reward-model"] = commands["ppo --init-from"]
    with pytest.raises(SystemExit) as e:
        commands[entry]()
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert f"{bad}/ckpt.pt: weights that are not finite numbers" in err, err
    assert not (tmp_path / "hf").exists()


NESTED = "[" * 200_000 + "]" * 200_000  # deeper than Python's parser can follow


def test_json_nested_too_deeply_is_one_line_naming_the_file_and_line(tmp_path):
    from ground import UserError, jsonl_rows, read_json
    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"a": 1}\n' + NESTED + "\n")
    with pytest.raises(UserError, match=f"^{rows}:2: JSON nested too deeply to read$"):
        list(jsonl_rows(str(rows)))
    whole = tmp_path / "whole.json"
    whole.write_text(NESTED)
    with pytest.raises(UserError, match=f"^{whole}: JSON nested too deeply to read$"):
        read_json(str(whole))


@pytest.mark.parametrize("flag", ["sft --data", "ppo --prompts-file", "sample --loss-mask"])
def test_every_reader_of_a_users_json_refuses_deep_nesting_in_one_line(
        flag, tiny_base, tiny_sft, tiny_reward, tmp_path, capsys):
    import ppo
    import sample
    bad = tmp_path / "bad.jsonl"
    bad.write_text(NESTED + "\n")
    commands = {
        "sft --data": lambda: sft.main(["--preset", "tiny", "--init-from", tiny_base, "--data",
                                        str(bad), "--out-dir", str(tmp_path / "run")]),
        "ppo --prompts-file": lambda: ppo.main(["--preset", "tiny", "--init-from", tiny_sft,
                                                "--reward-model", tiny_reward, "--prompts-file",
                                                str(bad), "--out-dir", str(tmp_path / "run")]),
        "sample --loss-mask": lambda: sample.main(["--ckpt", tiny_sft, "--loss-mask", str(bad)]),
    }
    with pytest.raises(SystemExit) as e:
        commands[flag]()
    assert e.value.code == 2
    assert "JSON nested too deeply to read" in capsys.readouterr().err
