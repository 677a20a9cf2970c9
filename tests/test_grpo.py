"""grpo.py: advantages relative to the group, no gradient from a group that scored alike, a ratio
of 1 at the start, a programmatic reward learnt, the teacher as the reward, the command line."""
import copy
import dataclasses
import json

import pytest
import torch

import grpo
import plot
import rl
from checkpoints import load_checkpoint
from data import chats, teacher
from tests.test_ppo import short_answers_score


@pytest.fixture(scope="module")
def models(tiny_sft):
    policy, tok, _ = load_checkpoint(tiny_sft, ["sft"])
    return policy, copy.deepcopy(policy).eval().requires_grad_(False), tok


def tiny_settings(**kw):
    settings = grpo.Settings(updates=6, rollout_batch=8, group_size=4, minibatch=16, epochs=2,
                             max_new_tokens=12, temperature=1.0, lr=3e-4)
    return dataclasses.replace(settings, **kw)


def group_rollout(policy, tok, groups=2, group_size=4):
    items = [item for item in chats.rl_prompts("ppo", n=groups) for _ in range(group_size)]
    return items, rl.rollout(policy.eval(), tok, items, max_new_tokens=10, temperature=1.0,
                             seed=1)


# ----------------------------------------------------------------------------- advantages
def test_advantages_sum_to_zero_within_each_group_and_a_uniform_group_has_none():
    scores = torch.tensor([1.0, 0.0, 0.5, 0.5, 0.3, 0.3, 0.3, 0.3, -1.0, 2.0, 0.0, 0.0])
    advantages, no_signal = grpo.group_advantages(scores, group_size=4, eps=1e-4)
    groups = advantages.view(3, 4)
    torch.testing.assert_close(groups.sum(1), torch.zeros(3), atol=1e-5, rtol=0)
    assert torch.equal(groups[1], torch.zeros(4)) and no_signal == pytest.approx(1 / 3)
    expected = (scores[:4] - scores[:4].mean()) / (scores[:4].std() + 1e-4)  # sample std
    torch.testing.assert_close(groups[0], expected)
    assert groups[2].argmax() == 1 and groups[2].argmin() == 0


def test_a_group_whose_answers_all_score_the_same_gives_no_gradient(models):
    policy, _, tok = models
    policy = copy.deepcopy(policy).train()
    _, batch = group_rollout(policy, tok)
    scores = torch.tensor([0.7, 0.7, 0.7, 0.7, 1.0, 0.0, 0.2, 0.9])  # group 1 alike, 2 not
    advantages, _ = grpo.group_advantages(scores, group_size=4, eps=1e-4)
    with torch.no_grad():
        old = rl.answer_logprobs(policy, batch, 1.0)
    for rows, moves in ((slice(0, 4), False), (slice(4, 8), True)):
        part = {"ids": batch["ids"][rows], "pad": batch["pad"][rows],
                "mask": batch["mask"][rows], "prompt_len": batch["prompt_len"]}
        new, _ = rl.logprobs_and_entropy(policy, part, 1.0)
        loss, stats = grpo.grpo_loss(new_logprobs=new, old_logprobs=old[rows],
                                     ref_logprobs=old[rows], advantages=advantages[rows],
                                     mask=part["mask"], clip_ratio=0.2, kl_coef=0.0)
        policy.zero_grad()
        loss.backward()
        norm = sum(p.grad.abs().sum().item() for p in policy.parameters() if p.grad is not None)
        assert (norm > 1e-6) == moves, (rows, norm)
        # the first minibatch of an update: the policy is the rollout's, the ratio 1
        assert stats["ratio"] == pytest.approx(1.0, abs=1e-5)
        assert stats["approx_kl"] == pytest.approx(0.0, abs=1e-6)
        assert stats["clip_fraction"] == 0


def test_the_teacher_reward_is_the_rubrics_score(models):
    policy, _, tok = models
    items, batch = group_rollout(policy, tok)
    scores, texts = grpo.teacher_scores(tok, items, batch)
    assert texts == rl.answer_texts(tok, batch)
    expected = [teacher.judge(item, text, ended)["score"]
                for item, text, ended in zip(items, texts, batch["ended"].tolist())]
    assert scores.tolist() == pytest.approx(expected)
    assert len(set(expected)) > 1  # not a constant


# ----------------------------------------------------------------------------- it learns
def test_a_few_updates_raise_a_programmatic_reward(models):
    policy, reference, tok = models
    settings = tiny_settings(updates=8, lr=1e-3)
    networks = grpo.Networks(policy=copy.deepcopy(policy), reference=reference)
    lines = grpo.train(networks, tok, settings, grpo.prompt_pool(settings),
                       score_fn=short_answers_score, log=lambda line: None)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    first, last = lines[0]["score"], sum(r["score"] for r in lines[-2:]) / 2
    assert last > first + 0.3, [r["score"] for r in lines]
    assert lines[-1]["length"] < lines[0]["length"] and lines[-1]["kl"] > 0
    assert all(0 <= r["no_signal_share"] <= 1 for r in lines)


def test_pass_at_g_is_at_least_pass_at_1(models):
    policy, _, tok = models
    found = grpo.pass_at_g(policy, tok, tiny_settings(group_size=3, max_new_tokens=6))
    assert found["prompts"] == len(chats.eval_prompts("heldout"))
    assert 0 <= found["pass_at_1"] <= found["pass_at_g"] <= 1


def test_the_command_line_with_the_teacher_and_with_a_reward_model(tiny_sft, tiny_reward,
                                                                   tmp_path):
    import sample
    out = tmp_path / "grpo"
    grpo.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
               "--out-dir", str(out), "--updates", "2"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("score", "no_signal_share", "kl", "entropy", "clip_fraction", "approx_kl",
                "length", "end_rate", "gold_score"):
        assert key in log[0], key
    assert log[0]["score"] == pytest.approx(log[0]["gold_score"])  # the teacher is the reward
    ev = json.loads((out / "eval.json").read_text())
    assert ev["reward"] == "teacher" and ev["pass_at_g"]["sft"]["group_size"] == 4
    assert ev["sampled"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    assert set(ev["sft"]) == set(ev["grpo"]) >= {"heldout", "heldout_claims"}
    sample.main(["--compare", tiny_sft, str(out), "--prompt", "hi", "--max-new-tokens", "4",
                 "--device", "cpu"])
    rm_out = tmp_path / "grpo-rm"
    grpo.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
               "--reward-model", tiny_reward, "--out-dir", str(rm_out), "--updates", "2",
               "--no-behaviour-eval"])
    ev = json.loads((rm_out / "eval.json").read_text())
    assert ev["reward"] == tiny_reward and ev["updates"] == 2
    log = [json.loads(line) for line in open(rm_out / "log.jsonl")]
    assert log[0]["score"] != pytest.approx(log[0]["gold_score"])


def test_resume_continues_the_same_run(tiny_sft, tmp_path):
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--updates", "4",
            "--save-every", "1", "--no-behaviour-eval"]
    grpo.main(args + ["--out-dir", str(tmp_path / "a")])
    grpo.main(args + ["--out-dir", str(tmp_path / "b"), "--stop-at", "2"])
    assert not (tmp_path / "b" / "eval.json").exists()
    grpo.main(["--resume", "--device", "cpu", "--out-dir", str(tmp_path / "b")])
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    assert plot.stage_of(logs[0]) == "grpo"
    for one, two in zip(*logs):
        assert one["score"] == pytest.approx(two["score"], abs=1e-4)
        assert one["kl"] == pytest.approx(two["kl"], abs=1e-4)


@pytest.mark.parametrize("flags, message", [
    (["--group-size", "1"], "a group compares at least 2 answers"),
    (["--init-from", "BASE"], "is a 'base' checkpoint; expected sft or ppo or dpo or grpo"),
    (["--reward-model", "OTHER"], "descends from another base model"),
    (["--prompts-file", "PROMPTS"], "--prompts-file needs --reward-model"),
    (["--prompts-file", "BAD", "--reward-model", "RM"], "bad.jsonl:2"),
])
def test_bad_input_is_one_line_before_any_work(tiny_sft, tiny_base, tiny_reward, tmp_path,
                                               capsys, flags, message):
    other = tmp_path / "other-reward"
    other.mkdir()
    reward_model, tok, ckpt = load_checkpoint(tiny_reward, ["reward"])
    reward_model.base_id = "another pretraining run"
    from checkpoints import save_checkpoint
    save_checkpoint(str(other), "reward", reward_model, tok, config=ckpt["config"])
    (other / "tokenizer.json").write_bytes(open(f"{tiny_reward}/tokenizer.json", "rb").read())
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "hi"}\n')
    (tmp_path / "bad.jsonl").write_text('{"prompt": "hi"}\n{"nothing": 1}\n')
    names = {"BASE": tiny_base, "OTHER": str(other), "RM": tiny_reward,
             "PROMPTS": str(tmp_path / "prompts.jsonl"), "BAD": str(tmp_path / "bad.jsonl")}
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("{}")  # an earlier run's result stays as it was
    with pytest.raises(SystemExit) as stopped:
        grpo.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--out-dir",
                   str(out), *[names.get(f, f) for f in flags]])
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]
    assert (out / "eval.json").read_text() == "{}"


def test_torchrun_runs_the_command_line_in_two_processes(tiny_sft, tmp_path):
    """Each process answers its share of the prompts, whole groups each; the log is written
    once, its statistics the means over the processes."""
    from tests.conftest import torchrun
    out = tmp_path / "grpo"
    torchrun("grpo.py", ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
                         "--out-dir", str(out), "--updates", "2", "--rollout-batch", "4",
                         "--minibatch", "4", "--no-behaviour-eval"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2] and log[0]["kl"] == pytest.approx(0.0, abs=1e-4)
    assert load_checkpoint(str(out), ["grpo"])[2]["step"] == 2
