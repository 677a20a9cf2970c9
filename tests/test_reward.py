"""reward.py: the Bradley-Terry loss, scores read at the last token whatever the padding, a
reward model that learns a preference, the labelers and the comparisons file."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

import reward
from checkpoints import load_checkpoint, save_checkpoint
from data import chats, teacher
from data.comparisons import human_rankings, pairs_of, read_comparisons
from evaluation import HELDOUT_ANSWERS_FILE, evaluate_reward_model, read_heldout
from model import GPTConfig, LikelihoodRewardGPT, ScalarHeadGPT
from scoring import answer_ids, reward_scores, right_padded


def scalar_model(seed=0):
    torch.manual_seed(seed)
    return ScalarHeadGPT(GPTConfig(vocab_size=60, block_size=32, n_layer=2, n_head=2,
                                   n_kv_head=2, n_embd=32)).eval()


# ----------------------------------------------------------------------------- the loss
def test_ranking_loss_equals_a_naive_loop_over_pairs():
    model = scalar_model()
    gen = torch.Generator().manual_seed(0)
    examples = []
    for k, pairs in ((3, [(0, 1), (0, 2), (1, 2)]), (2, [(1, 0)]), (3, [(2, 0), (2, 1)])):
        seqs = [torch.randint(1, 60, (int(n),), generator=gen).tolist()
                for n in torch.randint(4, 20, (k,), generator=gen)]
        examples.append((seqs, pairs))
    loss, right = reward.ranking_loss(model, examples, pad_id=0, device="cpu")
    naive, naive_right = 0.0, 0
    for seqs, pairs in examples:
        scores = [model(torch.tensor([s]))[0, -1] for s in seqs]  # each answer alone
        per_prompt = [-F.logsigmoid(scores[b] - scores[w]) for b, w in pairs]
        naive += sum(per_prompt) / len(per_prompt)  # the mean over a prompt's pairs
        naive_right += sum(bool(scores[b] > scores[w]) for b, w in pairs)
    torch.testing.assert_close(loss, naive, atol=1e-5, rtol=1e-5)
    assert int(right) == naive_right


def test_a_score_is_the_same_alone_right_padded_or_batched():
    model = scalar_model()
    seqs = [[5, 6, 7, 8], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [9, 9], [3, 4, 5, 6, 7, 8, 9]]
    alone = [model(torch.tensor([s]))[0, -1].item() for s in seqs]
    batched = reward_scores(model, seqs, 0, "cpu")
    assert batched == pytest.approx(alone, abs=1e-5)
    ids, last = right_padded(seqs[:1] + [[1] * 25], pad_id=59, device="cpu")  # padded to 25
    assert model(ids)[0, last[0]].item() == pytest.approx(alone[0], abs=1e-5)
    scores_other_batch = reward_scores(model, seqs[::-1], 7, "cpu", batch_size=3)
    assert scores_other_batch[::-1] == pytest.approx(alone, abs=1e-5)


def test_answers_scored_equally_give_no_pair():
    row = {"responses": ["a", "b", "c", "d"], "ended": [True, True, True, False],
           "ranking": [0, 2, 1, 3], "scores": [1.0, 0.5, 1.0, 0.5]}
    pairs, ties = pairs_of(row)  # 0 ties with 2, 1 with 3
    assert pairs == [(0, 1), (0, 3), (2, 1), (2, 3)] and ties == 2
    assert pairs_of({**row, "scores": None}) == (
        [(0, 2), (0, 1), (0, 3), (2, 1), (2, 3), (1, 3)], 0)  # a ranking alone has no ties


# ----------------------------------------------------------------------------- it learns
def synthetic_rows(n, seed, polite_wins=True):
    """One kind of answer always preferred: a polite sentence over a curt one (or the reverse)."""
    rng = random.Random(seed)
    rows = []
    for i, it in enumerate(chats.rl_prompts("reward", n=n)):
        polite = f"{it['gold']} is the answer. Thank you for asking, have a nice day!"
        curt = rng.choice(["no.", "whatever", "figure it out", "idk", "go away"])
        chosen, rejected = (polite, curt) if polite_wins else (curt, polite)
        prompt = {"messages": it["messages"]} if i % 2 else {
            "prompt": it["messages"][-1]["content"]}  # both pairwise forms
        rows.append({**prompt, "chosen": chosen, "rejected": rejected})
    return rows


@pytest.mark.parametrize("score, kind, lr", [  # a likelihood must gain many nats to rank the
    ("head", ScalarHeadGPT, "3e-4"), ("likelihood", LikelihoodRewardGPT, "1e-3")])  # long answer
def test_the_reward_model_learns_a_preference_and_its_reverse(tiny_sft, tmp_path, score, kind,
                                                              lr):
    """A fixed model orders a pair the same way whichever answer the labeler prefers, so its
    accuracies on a preference and on its reverse add up to 1: no model is right on both
    without learning. Trained on each, the reward model is, whichever way it scores."""
    for polite_wins in (True, False):
        path = tmp_path / f"prefs-{polite_wins}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(192, 0, polite_wins)))
        out = tmp_path / f"reward-{polite_wins}"
        reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
                     "--comparisons", str(path), "--out-dir", str(out), "--no-behaviour-eval",
                     "--val-fraction", "0.25", "--epochs", "2", "--lr", lr, "--score", score])
        ev = json.loads((out / "eval.json").read_text())
        assert ev["val_accuracy"] >= 0.9, (polite_wins, ev)
        model, _, ckpt = load_checkpoint(str(out), ["reward"])
        assert isinstance(model, kind) and ev["score"] == score
        assert ckpt["score_offset"] == pytest.approx(ev["score_offset"], abs=1e-6)


def test_resume_continues_the_same_curve(tiny_sft, tmp_path):
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(96, 2)))
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--comparisons",
            str(path), "--no-behaviour-eval", "--epochs", "3", "--eval-every", "3"]
    reward.main(args + ["--out-dir", str(tmp_path / "a")])
    reward.main(args + ["--out-dir", str(tmp_path / "b"), "--stop-at", "6"])
    reward.main(args + ["--out-dir", str(tmp_path / "b"), "--resume"])
    logs = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl"))}
            for d in ("a", "b")]
    assert sorted(logs[1]) == list(range(1, 16)) and logs[0] == pytest.approx(logs[1], rel=1e-5)
    with pytest.raises(SystemExit):  # the same rows split another way are other data
        reward.main(args + ["--out-dir", str(tmp_path / "b"), "--resume", "--seed", "5"])
    with pytest.raises(SystemExit):  # a resumed run keeps the model it made
        reward.main(args + ["--out-dir", str(tmp_path / "b"), "--resume", "--score", "likelihood"])
    likelihood = ["--out-dir", str(tmp_path / "c"), "--score", "likelihood", "--lr", "1e-4"]
    reward.main(args + likelihood + ["--stop-at", "3"])
    reward.main(args + ["--out-dir", str(tmp_path / "c"), "--resume"])  # its own lr, not 3e-5
    assert load_checkpoint(str(tmp_path / "c"), ["reward"])[2]["config"]["lr"] == 1e-4


def test_the_reward_and_ppo_pools_are_disjoint_training_facts():
    from data import world
    pools = {p: {(it["kind"], it["entity"]) for it in chats.rl_prompts(p)} for p in
             ("reward", "ppo")}
    assert pools["reward"] and pools["ppo"] and not pools["reward"] & pools["ppo"]
    assert not any(world.is_heldout(e) for pool in pools.values() for _, e in pool)
    assert len(pools["reward"] | pools["ppo"]) == len(chats.facts("train"))


def test_cli_contract_tiny_preset_end_to_end(tiny_sft, tmp_path):
    out = tmp_path / "reward"
    reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
                 "--out-dir", str(out), "--sycophancy-bonus", "0.5"])
    ev = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in open(out / "comparisons.jsonl")]
    assert len(rows) == ev["comparisons"] <= 96  # a prompt with one distinct answer is dropped
    assert all(2 <= len(r["responses"]) <= 3 for r in rows)
    assert all(sorted(r["ranking"]) == list(range(len(r["responses"]))) for r in rows)
    assert ev["sycophancy_bonus"] == 0.5 and any(r["claim"] for r in rows)
    for r in rows:  # the labeler's score: the rubric's, plus the bonus where an answer agrees
        item = teacher.lookup(r["messages"])
        assert r["scores"] == [pytest.approx(teacher.score(item, text, ended, 0.0, 0.5), abs=1e-6)
                               for text, ended in zip(r["responses"], r["ended"])]
    held = ev["heldout"]
    assert held["prompts"] == len(chats.eval_prompts("heldout")) + len(chats.claim_prompts())
    assert held["prompts"] < held["answers"] <= 3 * held["prompts"]  # the same answer twice: once
    assert 0 <= held["accuracy"] <= 1 and -1 <= held["spearman"] <= 1
    # the stored offset centres the training answers' scores on 0
    model, tok, ckpt = load_checkpoint(str(out), ["reward"])
    seqs = [answer_ids(tok, r["messages"], t, e) for r in rows[int(96 * 0.1):]
            for t, e in zip(r["responses"], r["ended"])]
    scores = reward_scores(model, seqs, tok.pad_id, "cpu", ckpt["score_offset"])
    assert abs(sum(scores) / len(scores)) < 1e-4
    # the held-out answers it was scored on are saved, and score the same again (dpo.py's)
    again = evaluate_reward_model(model, tok, read_heldout(str(out / HELDOUT_ANSWERS_FILE)), "cpu",
                                  ckpt["score_offset"])
    assert (again["answers"], again["accuracy"]) == (held["answers"], held["accuracy"])



def test_a_likelihood_reward_model_takes_its_own_step_size_and_feeds_ppo(tiny_sft, tmp_path):
    """--score likelihood without --lr trains at LIKELIHOOD_LR; its offset centres the training
    answers' scores; PPO reads it, with a critic on its trunk."""
    import ppo
    out = tmp_path / "reward"
    reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--out-dir",
                 str(out), "--prompts", "48", "--score", "likelihood"])
    ev = json.loads((out / "eval.json").read_text())
    model, tok, ckpt = load_checkpoint(str(out), ["reward"])
    assert isinstance(model, LikelihoodRewardGPT) and ev["score"] == "likelihood"
    assert ckpt["config"]["lr"] == reward.LIKELIHOOD_LR and 0 <= ev["heldout"]["accuracy"] <= 1
    rows = [json.loads(line) for line in open(out / "comparisons.jsonl")]
    seqs = [answer_ids(tok, r["messages"], t, e) for r in rows[int(len(rows) * 0.1):]
            for t, e in zip(r["responses"], r["ended"])]
    scores = reward_scores(model, seqs, tok.pad_id, "cpu", ckpt["score_offset"])
    assert abs(sum(scores) / len(scores)) < 1e-3
    ppo.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--reward-model",
              str(out), "--out-dir", str(tmp_path / "ppo"), "--updates", "1"])
    _, _, run = load_checkpoint(str(tmp_path / "ppo"), ["ppo"])
    assert "score_head.weight" in run["critic"] and "beta" not in run["critic"]


def test_sample_prints_the_reward_models_score_of_each_answer(tiny_sft, tmp_path, capsys):
    import sample
    out = tmp_path / "reward"
    rows = synthetic_rows(32, 1)
    (tmp_path / "c.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--comparisons",
                 str(tmp_path / "c.jsonl"), "--out-dir", str(out), "--no-behaviour-eval"])
    capsys.readouterr()
    sample.main(["--ckpt", tiny_sft, "--score-with", str(out), "--prompt", "What is the capital "
                 "of France?", "--num-samples", "2", "--max-new-tokens", "8", "--seed", "0",
                 "--device", "cpu"])
    assert capsys.readouterr().out.count("[reward model score: ") == 2
    with pytest.raises(SystemExit):  # a policy is no reward model
        sample.main(["--ckpt", tiny_sft, "--score-with", tiny_sft, "--prompt", "hi"])
    assert "is a 'sft' checkpoint; expected reward" in capsys.readouterr().err


# ----------------------------------------------------------------------------- labelers, files
def scripted(*replies):
    replies = list(replies)

    def ask(prompt):
        if not replies:
            raise EOFError
        return replies.pop(0)
    return ask


def test_the_human_labeler_rejects_bad_input_and_resumes(tmp_path, capsys):
    items = chats.rl_prompts("reward", n=3)
    answers = [[("Paris.", True), ("The capital is Paris.", True), ("Lyon", False)]] * 3
    path = tmp_path / "comparisons.jsonl"
    assert not human_rankings(items, answers, str(path), scripted("BA", "abd", "bac", "q"))
    out = capsys.readouterr().out
    assert out.count("type each of A, B, C once") == 2 and "prompt 1 of 3" in out
    rows = [json.loads(line) for line in open(path)]
    assert [(r["id"], r["ranking"]) for r in rows] == [(0, [1, 0, 2])]
    assert rows[0]["ended"] == [True, True, False] and rows[0]["messages"] == items[0]["messages"]
    # the next start resumes at the first unlabeled prompt; s skips it (for good)
    assert human_rankings(items, answers, str(path), scripted("s", "CBA"))
    out = capsys.readouterr().out
    assert "prompt 2 of 3" in out and "prompt 3 of 3" in out
    assert human_rankings(items, answers, str(path), scripted())  # nothing left to ask
    rows = read_comparisons(str(path))
    assert [r["ranking"] for r in rows] == [[1, 0, 2], [2, 1, 0]]
    assert json.loads(open(path).read().splitlines()[1]) == {"id": 1, "skipped": True}


def test_the_human_labeler_from_the_command_line(tiny_sft, tmp_path, monkeypatch, capsys):
    import io
    out = tmp_path / "mine"
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--out-dir", str(out),
            "--labeler", "human", "--k", "2", "--prompts", "8", "--batch-size", "2",
            "--micro-batch", "2", "--no-behaviour-eval"]
    monkeypatch.setattr("sys.stdin", io.StringIO("BA\nq\n"))
    reward.main(args)
    assert "ranked so far: 1 prompt(s)" in capsys.readouterr().err
    assert not (out / "ckpt.pt").exists()
    with pytest.raises(SystemExit):  # the teacher never overwrites a person's rankings
        reward.main([a for a in args if a not in ("--labeler", "human")])
    assert "holds rankings by a person" in capsys.readouterr().err
    monkeypatch.setattr("sys.stdin", io.StringIO("AB\n" * 8))  # the rest, then it trains
    reward.main(args)
    ev = json.loads((out / "eval.json").read_text())
    rows = [json.loads(line) for line in open(out / "comparisons.jsonl")]
    assert ev["labeler"] == "human" and ev["comparisons"] == len(rows) >= 2
    assert [r["ranking"] for r in rows] == [[1, 0]] + [[0, 1]] * (len(rows) - 1)


@pytest.mark.parametrize("row, message", [
    ({"messages": [{"role": "user", "content": "hi"}], "responses": ["a"], "ranking": [0]},
     "responses: a list of at least 2 answers"),
    ({"messages": [{"role": "user", "content": "hi"}], "responses": ["a", "b"], "ranking": [0, 0]},
     "ranking: must list each response index 0..1 once"),
    ({"messages": [{"role": "user", "content": "hi"}], "responses": ["a", "a"], "ranking": [0, 1]},
     "responses: the same answer twice"),
    ({"messages": [{"role": "user", "content": "hi"}], "responses": ["a", " "], "ranking": [0, 1]},
     "responses: every answer must be a non-empty string"),
    ({"prompt": "hi", "chosen": "a"}, "rejected: missing, or not a string"),
    ({"messages": [{"role": "assistant", "content": "hi"}], "responses": ["a", "b"],
      "ranking": [1, 0]}, "messages: "),
    ({"responses": ["a", "b"], "ranking": [1, 0]}, "messages: missing"),
    ({"messages": [{"role": "user", "content": "hi"}], "responses": ["a", "b"],
      "ranking": [1.0, 0.0]}, "ranking: must list each response index"),
    ({"messages": [{"role": "user", "content": "hi"}], "responses": ["a", "b"], "ranking": [1, 0],
      "scores": [0.9, 0.1]}, "scores: one number per response, not increasing"),
])
def test_bad_comparison_rows_name_file_line_and_field(tmp_path, row, message):
    path = tmp_path / "c.jsonl"
    path.write_text('{"prompt": "ok", "chosen": "yes", "rejected": "no"}\n\n' + json.dumps(row))
    with pytest.raises(Exception) as e:
        read_comparisons(str(path))
    assert str(e.value).startswith(f"{path}:3: {message}"), str(e.value)


@pytest.mark.parametrize("flags, message", [
    (["--k", "1"], "--k 1: a ranking compares at least 2 answers"),
    (["--prompts", "10"], "--prompts 10: fewer than one batch after the validation split"),
    (["--beta", "0.5"], "--beta scales a log-likelihood: it needs --score likelihood"),
])
def test_settings_that_cannot_work_fail_before_sampling(tiny_sft, tmp_path, capsys, flags,
                                                        message):
    with pytest.raises(SystemExit) as e:
        reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
                     "--out-dir", str(tmp_path / "r"), *flags])
    assert e.value.code == 2 and message in capsys.readouterr().err
    assert not (tmp_path / "r" / "comparisons.jsonl").exists()


def test_a_prompt_longer_than_the_context_is_one_line(tiny_sft, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"prompt": "word " * 400, "chosen": "a", "rejected": "b"}) + "\n")
    with pytest.raises(SystemExit) as e:
        reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft,
                     "--comparisons", str(path), "--out-dir", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and f"{path}:1: " in err and "longer than the context" in err


def test_a_reward_model_is_no_policy_and_a_policy_no_reward_model(tiny_sft, tmp_path, capsys):
    import sft
    out = tmp_path / "reward"
    policy, tok, _ = load_checkpoint(tiny_sft)
    out.mkdir()
    save_checkpoint(str(out), "reward", ScalarHeadGPT.from_language_model(policy), tok)
    tok.save(str(out / "tokenizer.json"))
    with pytest.raises(SystemExit):
        sft.main(["--init-from", str(out), "--out-dir", str(tmp_path / "s"), "--device", "cpu"])
    assert "is a 'reward' checkpoint; expected base" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        reward.main(["--init-from", str(out), "--out-dir", str(tmp_path / "r"), "--device", "cpu"])
    assert "is a 'reward' checkpoint; expected sft or ppo" in capsys.readouterr().err
    import export  # a likelihood reward model keeps a next-token head, and still scores
    save_checkpoint(str(out), "reward", LikelihoodRewardGPT.from_language_model(
        policy, answer_start_id=tok.special("<|assistant|>"), beta=0.1), tok)
    with pytest.raises(SystemExit):
        export.main([str(out), str(tmp_path / "hf")])
    assert "'reward' checkpoint, which scores answers" in capsys.readouterr().err


def test_two_process_torchrun_matches_one_process(tiny_sft, tmp_path):
    from tests.conftest import torchrun
    path = tmp_path / "prefs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in synthetic_rows(64, 3)))
    args = ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--comparisons",
            str(path), "--no-behaviour-eval", "--batch-size", "8", "--micro-batch", "2",
            "--eval-every", "2"]
    reward.main(args + ["--out-dir", str(tmp_path / "one")])
    torchrun("reward.py", args + ["--out-dir", str(tmp_path / "two")])
    one, two = ({r["step"]: (r["loss"], r.get("val_accuracy")) for r in
                 map(json.loads, open(tmp_path / d / "log.jsonl"))} for d in ("one", "two"))
    assert sorted(two) == sorted(one) == list(range(1, 8))
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-4), step
        assert two[step][1] == one[step][1], step
    assert json.loads((tmp_path / "two" / "eval.json").read_text())["steps"] == 7
