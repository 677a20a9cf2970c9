"""Tests for ppo.py: GAE against a naive loop, where the reward sits, the
log-probs of sampling against the training forward, a ratio of 1 at the first minibatch, and a
programmatic reward that a few updates raise."""
import copy
import dataclasses
import json

import pytest
import torch

import ppo
import rl
import scoring
from checkpoints import load_checkpoint
from data import chats
from model import ScalarHeadGPT


def naive_gae(rewards, values, mask, gamma, lam):
    """GAE written out per row over its real tokens only, as in the papers."""
    advantages = torch.zeros_like(rewards)
    for b in range(len(rewards)):
        real = [t for t in range(rewards.shape[1]) if mask[b, t] > 0]
        running = 0.0
        for i in reversed(range(len(real))):
            t = real[i]
            next_value = values[b, real[i + 1]] if i + 1 < len(real) else 0.0
            delta = rewards[b, t] + gamma * next_value - values[b, t]
            running = delta + gamma * lam * running
            advantages[b, t] = running
    return advantages


def test_gae_equals_a_naive_backwards_loop_with_masks():
    g = torch.Generator().manual_seed(0)
    rewards, values = torch.randn(5, 9, generator=g), torch.randn(5, 9, generator=g)
    lengths = [9, 1, 4, 0, 6]
    mask = torch.tensor([[1.0] * n + [0.0] * (9 - n) for n in lengths])
    for gamma, lam in [(1.0, 0.95), (0.9, 0.5)]:
        advantages, returns = ppo.gae(rewards, values, mask, gamma, lam)
        torch.testing.assert_close(advantages, naive_gae(rewards, values, mask, gamma, lam))
        torch.testing.assert_close(returns, (advantages + values) * mask)


def test_the_reward_sits_on_the_last_real_token_and_padding_gets_nothing():
    logprobs, ref = torch.full((2, 4), -1.0), torch.full((2, 4), -1.5)
    mask = torch.tensor([[1.0, 1, 1, 0], [1.0, 0, 0, 0]])
    out = ppo.rewards(logprobs, ref, torch.tensor([2.0, -3.0]), mask, kl_coef=0.1)
    torch.testing.assert_close(out, torch.tensor([[-0.05, -0.05, 1.95, 0.0],
                                                  [-3.05, 0.0, 0.0, 0.0]]))
    whitened = rl.whiten(torch.randn(2, 4), mask)
    assert (whitened[mask == 0] == 0).all()
    assert abs(rl.masked_mean(whitened, mask).item()) < 1e-5


def test_padding_never_enters_a_loss_or_statistic():
    """Whatever sits on padded positions (here: large random values), the losses and statistics
    are those of the real tokens."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[1.0, 1, 1, 0, 0], [1.0, 1, 0, 0, 0]])
    clean = [torch.randn(2, 5, generator=g) * mask for _ in range(6)]
    dirty = [x + (1 - mask) * 10 * torch.randn(2, 5, generator=g) for x in clean]
    s = ppo.Settings()
    for a, b in zip(ppo.ppo_losses(*clean, mask, s), ppo.ppo_losses(*dirty, mask, s)):
        assert a == b if isinstance(a, dict) else torch.equal(a, b)
    assert ppo.explained_variance(clean[3], clean[5], mask) == ppo.explained_variance(
        dirty[3], dirty[5], mask)
    assert torch.equal(rl.whiten(clean[0], mask), rl.whiten(dirty[0], mask))


def test_kl_estimators_average_to_the_exact_kl_over_sampled_tokens():
    """k1 and k3, averaged over tokens drawn from the policy, estimate KL(policy || reference);
    k3 is never negative, and varies less."""
    g = torch.Generator().manual_seed(0)
    policy = (0.5 * torch.randn(50, generator=g)).log_softmax(-1)
    reference = (0.5 * torch.randn(50, generator=g)).log_softmax(-1)
    exact = (policy.exp() * (policy - reference)).sum().item()
    tokens = torch.multinomial(policy.exp(), 200_000, replacement=True, generator=g)
    k1 = rl.kl_k1(policy[tokens], reference[tokens])
    k3 = rl.kl_k3(policy[tokens], reference[tokens])
    assert (k1 < 0).any() and (k3 >= 0).all()
    assert k1.mean().item() == pytest.approx(exact, rel=0.03)
    assert k3.mean().item() == pytest.approx(exact, rel=0.03)
    assert k3.var() < k1.var()


def test_grad_clip_zero_clips_neither_network():
    """optimizer_steps with grad_clip 0 steps both networks as with no limit at all; a small
    limit steps them less far."""
    def step(grad_clip):
        torch.manual_seed(0)
        learners = [torch.nn.Linear(4, 1), torch.nn.Linear(4, 1)]
        opts = [torch.optim.SGD(model.parameters(), lr=0.1) for model in learners]
        x = torch.randn(8, 4)
        loss = sum((model(x) ** 2).mean() * 100 for model in learners)
        norms = ppo.optimizer_steps(learners, (opts, torch.amp.GradScaler("cpu", enabled=False)),
                                    loss, grad_clip)
        return [p.detach().clone() for model in learners for p in model.parameters()], norms
    unclipped, clipped, unlimited = step(0), step(1e-3), step(float("inf"))
    assert unclipped[1] == unlimited[1] and unclipped[1]["grad_norm_critic"] > 1e-3
    assert all(torch.equal(a, b) for a, b in zip(unclipped[0], unlimited[0]))
    assert not torch.equal(unclipped[0][0], clipped[0][0])


@pytest.fixture(scope="module")
def models(tiny_sft):
    policy, tok, _ = load_checkpoint(tiny_sft, ["sft"])
    torch.manual_seed(0)
    critic = ScalarHeadGPT.from_language_model(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    return policy, reference, critic, tok


def tiny_settings(**kw):
    s = ppo.Settings(updates=6, rollout_batch=16, minibatch=8, ppo_epochs=2, max_new_tokens=12,
                     temperature=1.0, lr=3e-4, kl_coef=0.02)
    return dataclasses.replace(s, **kw)


def test_sampled_logprobs_equal_the_training_forward_for_left_padded_prompts(models):
    """Log-probs recomputed on the left-padded batch equal those of each prompt and its answer
    run alone (temperature applied in both); the first minibatch's ratio is 1."""
    policy, _, critic, tok = models
    s = tiny_settings(temperature=0.7)
    items = chats.rl_prompts("ppo", n=6)
    batch = rl.rollout(policy.eval(), tok, items, max_new_tokens=s.max_new_tokens,
                       temperature=s.temperature, seed=3)
    assert len(set(batch["pad"].tolist())) > 1  # prompts of different lengths
    together = rl.answer_logprobs(policy, batch, s.temperature)
    L = batch["prompt_len"]
    for b in range(len(items)):
        n = int(batch["mask"][b].sum())
        alone = batch["ids"][b:b + 1, int(batch["pad"][b]):L + n]
        expected = policy.token_logprobs(alone, temperature=0.7)[0, -n:]
        torch.testing.assert_close(together[b, :n], expected, atol=1e-4, rtol=1e-4)
    training, entropy = rl.logprobs_and_entropy(policy, batch, s.temperature)
    torch.testing.assert_close(training, together)
    assert (entropy >= 0).all()
    values = ppo.answer_values(critic, batch)
    zeros = torch.zeros_like(together)
    _, _, stats = ppo.ppo_losses(together, together.clone(), zeros, values, values, values,
                                 batch["mask"], s)
    assert stats["ratio"] == pytest.approx(1.0) and stats["approx_kl"] == pytest.approx(0.0)


def short_answers_score(tok, items, batch):
    """+1 for an answer that ends within 6 tokens, else 0: a reward PPO can learn in seconds."""
    ended, length = batch["ended"], batch["mask"].sum(1)
    return ((ended & (length <= 6)).float(), [""] * len(items))


def test_a_few_updates_raise_a_programmatic_reward(models):
    policy, reference, critic, tok = models
    policy, critic = copy.deepcopy(policy), copy.deepcopy(critic)
    s = tiny_settings(updates=8, rollout_batch=32, lr=1e-3)
    networks = ppo.Networks(policy=policy, reference=reference, reward_model=None, critic=critic)
    lines = ppo.train(networks, tok, s, ppo.prompt_pool(s), score_fn=short_answers_score,
                      log=lambda line: None)
    assert lines[0]["kl"] == pytest.approx(0.0, abs=1e-4)  # the policy starts as the reference
    first, last = lines[0]["score"], sum(r["score"] for r in lines[-2:]) / 2
    assert last > first + 0.3, [r["score"] for r in lines]
    assert lines[-1]["length"] < lines[0]["length"] and lines[-1]["kl"] > 0


def test_the_command_line_trains_saves_a_policy_and_compares_it_with_sft(tiny_sft, tiny_reward,
                                                                          tmp_path):
    import sample
    out = tmp_path / "ppo"
    ppo.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--reward-model",
              tiny_reward, "--out-dir", str(out), "--updates", "2"])
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [1, 2]
    for key in ("score", "gold_score", "kl", "entropy", "approx_kl", "clip_fraction", "ratio",
                "value_loss", "explained_variance", "grad_norm_policy", "length", "end_rate",
                "seconds_rollout", "seconds_scoring", "seconds_learning"):
        assert key in log[0], key
    ev = json.loads((out / "eval.json").read_text())
    assert ev["sampled"]["sft"]["kl_to_sft"] == pytest.approx(0.0, abs=1e-4)
    assert set(ev["sft"]) == set(ev["ppo"]) >= {"heldout", "heldout_claims"}
    _, _, ckpt = load_checkpoint(str(out), ["ppo"])
    assert ckpt["stage"] == "ppo"
    sample.main(["--ckpt", str(out), "--prompt", "hi", "--max-new-tokens", "4", "--device", "cpu"])


def test_sfts_own_greedy_figures_stand_in_for_the_reference_only_when_the_weights_match(
        tiny_sft, tmp_path, monkeypatch):
    import evaluation
    reference, tok, _ = load_checkpoint(tiny_sft, ["sft"])
    written = json.loads(open(f"{tiny_sft}/eval.json").read())["weights_sha256"]
    assert written == evaluation.weights_digest(reference)  # sft.py's model == the loaded one
    judged = []
    monkeypatch.setattr(evaluation, "evaluate_instruct",
                        lambda model, tok, known: judged.append(model) or {"fresh": True})
    monkeypatch.setattr(evaluation, "sampled_heldout", lambda *args, **kwargs: {})
    sets = {name: {"accuracy": 0.5} for name in evaluation.instruct_eval_sets()}
    (tmp_path / "eval.json").write_text(json.dumps({
        "weights_sha256": written, "device": "cpu", **sets,
        "eval_sets_sha256": evaluation.eval_sets_digest(evaluation.instruct_eval_sets())}))
    policy = copy.deepcopy(reference)
    settings = dict(temperature=1.0, max_new_tokens=4, seed=0, sft_dir=str(tmp_path))
    result = evaluation.policy_against_sft("ppo", policy, reference, tok, None, **settings)
    assert result["sft"] == sets and judged == [policy]
    assert result["sft_greedy_from"] == "the SFT run's eval.json"
    with torch.no_grad():
        reference.lm_head.weight[0, 0] += 1e-3  # other weights: SFT's figures no longer apply
    judged.clear()
    result = evaluation.policy_against_sft("ppo", policy, reference, tok, None, **settings)
    assert result["sft"] == {"fresh": True} and judged == [reference, policy]
    assert result["sft_greedy_from"] == "measured here"


def test_resume_continues_the_same_run(tiny_sft, tiny_reward, tmp_path):
    """Two updates, a stop, --resume for two more: the same log as four updates in one go (of
    a run of 5, so that neither evaluates)."""
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--reward-model",
            tiny_reward, "--updates", "5", "--save-every", "1"]
    ppo.main(args + ["--out-dir", str(tmp_path / "a"), "--stop-at", "4"])
    ppo.main(args + ["--out-dir", str(tmp_path / "b"), "--stop-at", "2"])
    assert not (tmp_path / "b" / "eval.json").exists()
    ppo.main(["--resume", "--device", "cpu", "--out-dir", str(tmp_path / "b"), "--stop-at", "4"])
    logs = [[json.loads(line) for line in open(tmp_path / d / "log.jsonl")] for d in "ab"]
    assert [r["step"] for r in logs[1]] == [1, 2, 3, 4]
    for one, two in zip(*logs):
        assert one["score"] == pytest.approx(two["score"], abs=1e-4)
        assert one["kl"] == pytest.approx(two["kl"], abs=1e-4)


def train_in_process(rank, sft_dir, out_dir, port):
    """One of two processes (gloo) training the tiny policy on the short-answer reward; writes
    its log lines, a checksum of its final weights and a whitening of its share."""
    import os
    from datetime import timedelta
    import torch.distributed as dist
    from training import Process
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2, timeout=timedelta(seconds=120))
    torch.set_num_threads(1)
    policy, tok, _ = load_checkpoint(sft_dir, ["sft"])
    torch.manual_seed(0)
    critic = ScalarHeadGPT.from_language_model(policy)
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    proc = Process(rank, 2, "cpu", torch.float32)
    networks = ppo.Networks(policy=policy, reference=reference, reward_model=None, critic=critic)
    settings = tiny_settings(updates=2)
    lines = ppo.train(networks, tok, settings, ppo.prompt_pool(settings), short_answers_score,
                      proc, log=lambda line: None)
    halves = torch.arange(12.0).reshape(2, 6)
    whitened = rl.whiten(halves[rank:rank + 1], torch.ones(1, 6), proc)
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump({"lines": lines, "weights": [p.double().sum().item() for p in
                                               policy.parameters()],
                   "whitened": whitened.tolist()}, f)
    dist.barrier()  # neither tears down gloo while the other still talks to it
    dist.destroy_process_group()
    # Leave without the interpreter's teardown: now and then a gloo thread still alive there
    # aborted the process ("terminate called without an active exception") after its work was
    # written; what the test checks is in the files above.
    os._exit(0)


def test_two_processes_stay_in_step_and_share_their_statistics(tiny_sft, tmp_path):
    """Under DDP each process samples and scores its half of each rollout batch: the gradients
    are averaged (both end with the same weights), the advantages are whitened over the whole
    batch, and every statistic logged is the same on both (a mean over the processes)."""
    import socket
    import torch.multiprocessing as mp
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    mp.spawn(train_in_process, args=(tiny_sft, str(tmp_path), port), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0]["weights"] == ranks[1]["weights"]
    assert ranks[0]["lines"] == ranks[1]["lines"]
    first = ranks[0]["lines"][0]
    assert first["kl"] == pytest.approx(0.0, abs=1e-4)  # means, not sums, over the processes:
    assert 0.5 < first["ratio"] < 1.8 and 0 <= first["clip_fraction"] <= 1  # (a sum: ~2.4)
    together = rl.whiten(torch.arange(12.0).reshape(2, 6), torch.ones(2, 6))
    torch.testing.assert_close(torch.tensor(ranks[0]["whitened"] + ranks[1]["whitened"]),
                               together)


def test_torchrun_runs_the_command_line_in_two_processes(tiny_sft, tiny_reward, tmp_path):
    from tests.conftest import torchrun
    out = tmp_path / "ppo"
    torchrun("ppo.py", ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
                        "--reward-model", tiny_reward, "--out-dir", str(out), "--updates", "3",
                        "--rollout-batch", "8", "--minibatch", "4", "--stop-at", "2"])
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [1, 2]
    _, _, ckpt = load_checkpoint(str(out), ["ppo"])
    assert ckpt["step"] == 2


def test_bad_input_gets_one_line_naming_it(tiny_base, tiny_sft, tiny_reward, tmp_path, capsys):
    import shutil
    ids = {load_checkpoint(d)[0].base_id for d in (tiny_base, tiny_sft, tiny_reward)}
    assert len(ids) == 1 and None not in ids  # the base model's id, carried by its descendants
    other = tmp_path / "other_reward"  # the same reward model, said to descend from another base
    shutil.copytree(tiny_reward, other)
    ckpt = torch.load(other / "ckpt.pt", weights_only=True)
    torch.save({**ckpt, "base_id": "another"}, other / "ckpt.pt")
    args = ["--preset", "tiny", "--device", "cpu", "--reward-model", tiny_reward]
    for extra, message in (
            (["--init-from", tiny_sft, "--reward-model", str(other)],
             "descends from another base model than --init-from"),
            (["--init-from", tiny_base], "is a 'base' checkpoint; expected sft or ppo"),
            (["--init-from", tiny_sft, "--max-new-tokens", "100000"],
             "+ --max-new-tokens 100000 exceeds the policy's context"),
            (["--init-from", tiny_sft, "--reward-model", tiny_sft],
             "is a 'sft' checkpoint; expected reward"),
            (["--gamma", "2"], "argument --gamma: must lie in 0 .. 1, got 2"),
            (["--lam", "1.5"], "argument --lam: must lie in 0 .. 1, got 1.5"),
            (["--no-end-penalty", "nan"], "argument --no-end-penalty: must be a finite number")):
        with pytest.raises(SystemExit) as stopped:
            ppo.main(args + extra + ["--out-dir", str(tmp_path / "out")])
        assert stopped.value.code == 2
        lines = capsys.readouterr().err.strip().splitlines()
        if message.startswith("argument "):  # argparse's own: its usage lines come first
            assert lines[0].startswith("usage:") and message in lines[-1], lines
        else:
            assert len(lines) == 1 and message in lines[0], lines


def test_a_nan_stops_the_run_and_keeps_the_last_good_checkpoint(tiny_sft, tiny_reward, tmp_path,
                                                                monkeypatch, capsys):
    calls = []
    rollout_scores = scoring.rollout_scores

    def nan_at_the_third_update(*args, **kwargs):
        calls.append(1)
        scores, texts = rollout_scores(*args, **kwargs)
        return scores * (float("nan") if len(calls) == 3 else 1.0), texts
    monkeypatch.setattr(scoring, "rollout_scores", nan_at_the_third_update)
    out = tmp_path / "ppo"
    with pytest.raises(SystemExit) as stopped:
        ppo.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--reward-model",
                  tiny_reward, "--out-dir", str(out), "--save-every", "1"])
    assert stopped.value.code == 1
    assert "policy loss is nan at step 3" in capsys.readouterr().err
    _, _, ckpt = load_checkpoint(str(out), ["ppo"])
    assert ckpt["step"] == 2


def test_a_prompts_file_trains_and_its_bad_rows_are_named(tiny_sft, tiny_reward, tmp_path,
                                                          capsys):
    path = tmp_path / "prompts.jsonl"
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--reward-model",
            tiny_reward, "--prompts-file", str(path), "--updates", "2", "--stop-at", "1"]
    path.write_text('{"prompt": "Write me a poem about rain"}\n')  # nothing the teacher judges
    ppo.main(args + ["--out-dir", str(tmp_path / "unjudged")])
    line = json.loads(open(tmp_path / "unjudged" / "log.jsonl").readline())
    assert "score" in line and "gold_score" not in line
    path.write_text('{"prompt": "What is the capital of Kenya?"}\n'
                    '{"messages": [{"role": "user", "content": "Write me a poem about rain"}]}\n')
    ppo.main(args + ["--out-dir", str(tmp_path / "judged")])
    line = json.loads(open(tmp_path / "judged" / "log.jsonl").readline())
    assert 0 <= line["accuracy"] <= 1  # the Kenya half of the batch, judged
    capsys.readouterr()
    for text, message in (
            ('{"messages": [{"role": "assistant", "content": "Hi."}]}\n',
             "prompts.jsonl:1: messages: message 0: expected a user turn"),
            ('{"prompt": "hi"}\nnot json\n', "prompts.jsonl:2: not valid JSON"),
            ('{"text": "hi"}\n', 'prompts.jsonl:1: expected {"messages": [...]} or {"prompt"'),
            ("\n", "prompts.jsonl: no prompts")):
        path.write_text(text)
        with pytest.raises(SystemExit):
            ppo.main(args + ["--out-dir", str(tmp_path / "bad")])
        err = capsys.readouterr().err
        assert message in err and len(err.strip().splitlines()) == 1, err


def test_an_answer_reaches_the_reward_model_as_the_tokens_the_policy_wrote(tiny_sft):
    """A rollout's answer becomes text (answer_texts) and the reward model's input again
    (answer_ids): both ways through the chat format's space, the same ids, no doubled space."""
    from scoring import answer_ids
    _, tok, _ = load_checkpoint(tiny_sft)
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.render_chat(messages, for_completion=True)[0]
    written = tok.encode_turn("Paris.") + [tok.special("<|end|>")]
    batch = {"prompt_len": len(prompt), "ids": torch.tensor([prompt + written]),
             "mask": torch.ones(1, len(written))}
    assert rl.answer_texts(tok, batch) == ["Paris."]
    assert answer_ids(tok, messages, "Paris.", True) == prompt + written
