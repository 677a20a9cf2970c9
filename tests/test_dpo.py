"""dpo.py: the loss against a naive loop, log 2 at the start, no gradient through the prompt or
the padding, a preference learned and its reverse, the implicit reward read as a reward model,
the command line."""
import copy
import json
import math
import shutil

import pytest
import torch

import dpo
import plot
from checkpoints import load_checkpoint
from evaluation import HELDOUT_ANSWERS_FILE, heldout_answers, write_heldout
from model import GPT, GPTConfig
from rl import ONE_PROCESS
from scoring import answer_ids, reward_scores, right_padded
from tests.test_reward import synthetic_rows

START = 7  # the answer-start token of the synthetic chats below; 0 is padding


def tiny_lm(seed):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocab_size=60, block_size=48, n_layer=2, n_head=2, n_kv_head=2,
                         n_embd=32)).eval()


def synthetic_examples(seed=0):
    """encode_comparisons' form: three prompts, each with its answers (a prompt, START, an
    answer: tokens 8..59) and its (better, worse) pairs."""
    gen = torch.Generator().manual_seed(seed)

    def tokens(n):
        return torch.randint(8, 60, (n,), generator=gen).tolist()
    examples = []
    for k, pairs in ((3, [(0, 1), (0, 2), (1, 2)]), (2, [(1, 0)]), (3, [(2, 0), (2, 1)])):
        prompt = tokens(int(torch.randint(3, 12, (1,), generator=gen)))
        answers = [prompt + [START] + tokens(int(n)) for n in torch.randint(1, 15, (k,),
                                                                             generator=gen)]
        examples.append((answers, pairs))
    return examples


def loss_of(policy, reference, examples, beta):
    references = dpo.reference_logprobs(reference, examples, pad_id=0, answer_start_id=START,
                                        proc=ONE_PROCESS)
    return dpo.preference_loss(policy, examples, references, beta=beta, pad_id=0,
                               answer_start_id=START, device="cpu")


# ----------------------------------------------------------------------------- the loss
def test_the_dpo_loss_equals_a_naive_loop_over_pairs():
    policy = tiny_lm(0)
    reference = tiny_lm(1)
    examples = synthetic_examples()
    loss, stats = loss_of(policy, reference, examples, beta=0.3)

    def logp(model, seq):  # each answer alone, token by token after the answer start
        logits = model(torch.tensor([seq]))[0][0].log_softmax(-1)
        start = seq.index(START)
        return sum(logits[t - 1, seq[t]].item() for t in range(start + 1, len(seq)))
    naive = 0.0
    right = 0
    for answers, pairs in examples:
        margins = [0.3 * ((logp(policy, answers[b]) - logp(reference, answers[b]))
                          - (logp(policy, answers[w]) - logp(reference, answers[w])))
                   for b, w in pairs]
        naive += sum(-math.log(1 / (1 + math.exp(-m))) for m in margins) / len(pairs)
        right += sum(m > 0 for m in margins)
    assert loss.item() == pytest.approx(naive, rel=1e-5)
    assert stats[0].item() == right and stats[1].item() == 6


def test_at_the_start_every_implicit_reward_is_0_and_the_loss_is_log_2():
    policy = tiny_lm(0)
    examples = synthetic_examples()
    loss, stats = loss_of(policy, copy.deepcopy(policy), examples, beta=0.1)
    assert loss.item() / len(examples) == pytest.approx(math.log(2), abs=1e-6)
    assert stats[0].item() == 0 and stats[2].item() == 0 and stats[3].item() == 0


class KeepLogits(torch.nn.Module):
    """A model whose logits keep their gradient, to see where the loss reaches."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, ids):
        self.logits, _ = self.model(ids)
        self.logits.retain_grad()
        return self.logits, None


def test_the_prompt_and_the_padding_get_no_gradient():
    examples = synthetic_examples()
    policy = KeepLogits(tiny_lm(0))
    loss, _ = loss_of(policy, tiny_lm(1), examples, beta=0.1)
    loss.backward()
    ids, last = right_padded([s for answers, _ in examples for s in answers], 0, "cpu")
    mask = dpo.answer_mask(ids, last, START)
    reached = policy.logits.grad.abs().sum(-1) > 0  # (B, T): position t predicts token t + 1
    assert torch.equal(reached[:, :-1], mask[:, 1:] > 0)
    assert not reached[:, -1].any()
    for other_pad in (3, 59):  # whatever fills the padding, the loss is the same
        references = dpo.reference_logprobs(tiny_lm(1), examples, pad_id=other_pad,
                                            answer_start_id=START, proc=ONE_PROCESS)
        padded, _ = dpo.preference_loss(tiny_lm(0), examples, references, beta=0.1,
                                        pad_id=other_pad, answer_start_id=START, device="cpu")
        assert padded.item() == pytest.approx(loss.item(), rel=1e-6)


def test_the_implicit_reward_read_as_a_reward_model_is_beta_times_the_log_ratio(tiny_sft):
    reference, tok, _ = load_checkpoint(tiny_sft, ["sft"])
    policy = copy.deepcopy(reference)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.02 * torch.randn_like(p))
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    seqs = [answer_ids(tok, messages, text, ended) for text, ended in
            (("Paris.", True), ("The capital of France is Berlin.", True), ("Oslo", False))]
    start = tok.special("<|assistant|>")
    implicit = dpo.ImplicitReward(policy, reference, answer_start_id=start, beta=0.2)
    read = reward_scores(implicit, seqs, tok.pad_id, "cpu")
    ids, last = right_padded(seqs, tok.pad_id, "cpu")
    mask = dpo.answer_mask(ids, last, start)
    with torch.no_grad():
        expected = 0.2 * (dpo.sequence_logprobs(policy, ids, mask)
                          - dpo.sequence_logprobs(reference, ids, mask))
    assert read == pytest.approx(expected.tolist(), abs=1e-4)
    assert len(set(round(r, 4) for r in read)) == 3  # not all zero


# ----------------------------------------------------------------------------- it learns
def dpo_args(tiny_sft, path, *extra):
    return ["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--comparisons",
            str(path), *extra]


def write_rows(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_dpo_learns_a_preference_and_its_reverse(tiny_sft, tmp_path):
    """At the start every implicit reward is 0, so no pair is ordered right (accuracy 0) on a
    preference or on its reverse; after training, both are."""
    for polite_wins in (True, False):
        path = write_rows(tmp_path / f"prefs-{polite_wins}.jsonl",
                          synthetic_rows(192, 0, polite_wins))
        out = tmp_path / f"dpo-{polite_wins}"
        dpo.main(dpo_args(tiny_sft, path, "--out-dir", str(out), "--no-behaviour-eval",
                          "--val-fraction", "0.25", "--epochs", "2", "--lr", "1e-3"))
        ev = json.loads((out / "eval.json").read_text())
        assert ev["val_accuracy"] >= 0.9, (polite_wins, ev)
        first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
        assert first["loss"] == pytest.approx(math.log(2), abs=1e-3) and first["accuracy"] == 0


def test_resume_continues_the_same_curve(tiny_sft, tmp_path):
    path = write_rows(tmp_path / "prefs.jsonl", synthetic_rows(96, 2))
    args = dpo_args(tiny_sft, path, "--no-behaviour-eval", "--epochs", "3", "--eval-every", "3")
    dpo.main(args + ["--out-dir", str(tmp_path / "a")])
    dpo.main(args + ["--out-dir", str(tmp_path / "b"), "--stop-at", "6"])
    dpo.main(args + ["--out-dir", str(tmp_path / "b"), "--resume"])
    logs = [{r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / d / "log.jsonl"))}
            for d in ("a", "b")]
    assert sorted(logs[1]) == list(range(1, 16)) and logs[0] == pytest.approx(logs[1], rel=1e-5)
    plot.main([str(tmp_path / "a")])  # its own panels
    assert plot.stage_of([json.loads(line) for line in open(tmp_path / "a" / "log.jsonl")]) == "dpo"
    with pytest.raises(SystemExit):  # the same rows split another way are other data
        dpo.main(args + ["--out-dir", str(tmp_path / "b"), "--resume", "--seed", "5"])


def test_cli_contract_tiny_preset_end_to_end(tiny_sft, tiny_reward, tmp_path):
    """With reward.py's held-out answers beside the comparisons, the implicit reward is scored
    on them, beside the reward model's figures; the policy is evaluated as PPO's is."""
    folder = tmp_path / "reward"
    folder.mkdir()
    shutil.copy(f"{tiny_reward}/comparisons.jsonl", folder)
    model, tok, _ = load_checkpoint(tiny_sft, ["sft"])
    heldout = heldout_answers(model, tok, k=2, temperature=1.0, max_new_tokens=8, seed=0)
    write_heldout(str(folder / HELDOUT_ANSWERS_FILE), heldout)
    (folder / "eval.json").write_text(json.dumps({"heldout": {"accuracy": 0.625,
                                                              "examples": []}}))
    out = tmp_path / "dpo"
    dpo.main(dpo_args(tiny_sft, folder / "comparisons.jsonl", "--out-dir", str(out)))
    ev = json.loads((out / "eval.json").read_text())
    assert ev["stage"] == "dpo" and ev["steps"] >= 1
    assert ev["implicit_reward_heldout"]["answers"] == sum(map(len, heldout[1]))
    assert ev["reward_model_heldout"] == {"accuracy": 0.625}
    assert {"sft", "dpo"} <= ev["sampled"].keys() and ev["sampled"]["sft"]["kl_to_sft"] == 0
    assert ev["dpo"]["heldout"]["accuracy"] >= 0 and "heldout_claims" in ev["sft"]
    lines = [json.loads(line) for line in open(out / "log.jsonl")]
    curve = [line for line in lines if "sampled_gold_score" in line]  # at each validation
    validations = [line["step"] for line in lines if "val_loss" in line]
    assert [line["step"] for line in curve] == validations
    assert curve and all(0 <= line["sampled_gold_score"] <= 1 for line in curve)
    policy, _, ckpt = load_checkpoint(str(out), ["dpo"])
    assert ckpt["step"] == ev["steps"] and policy.base_id == model.base_id


def test_the_curves_prompts_are_every_behaviour_and_claim():
    """The held-out prompts cycle through the behaviours: a stride that is a multiple of their
    number would sample one behaviour only."""
    from data import chats
    items = chats.eval_prompts("heldout") + chats.claim_prompts("heldout")
    for preset in ("cpu", "tiny"):
        every = dpo.PRESETS[preset].get("curve_every", dpo.Settings().curve_every)
        curve = items[::every]
        assert {it["behaviour"] for it in curve} == {it["behaviour"] for it in items}, preset
        claims = [it["claim"] == it["gold"] for it in curve if it["claim"] is not None]
        assert 0.4 < sum(claims) / len(claims) < 0.6, preset


@pytest.mark.parametrize("flags, message", [
    (["--beta", "0"], "must be positive"),
    (["--beta", "nan"], "must be positive"),
    (["--val-fraction", "1"], "leaves nothing to train on"),
    (["--comparisons", "TIES"], "no pair to learn from"),
    (["--init-from", "BASE"], "is a 'base' checkpoint; expected sft or ppo or dpo or grpo"),
    (["--batch-size", "512"], "fewer than one batch"),
])
def test_bad_input_is_one_line_before_any_work(tiny_sft, tiny_base, tmp_path, capsys, flags,
                                               message):
    path = write_rows(tmp_path / "prefs.jsonl", synthetic_rows(48, 1))
    ties = write_rows(tmp_path / "ties.jsonl", [
        {"messages": [{"role": "user", "content": "Hi"}], "responses": ["a", "b"],
         "ranking": [0, 1], "scores": [0.5, 0.5]}] * 40)
    flags = [{"TIES": str(ties), "BASE": tiny_base}.get(f, f) for f in flags]
    out = tmp_path / "out"
    out.mkdir()
    (out / "eval.json").write_text("{}")  # an earlier run's result stays as it was
    with pytest.raises(SystemExit) as stopped:
        dpo.main(dpo_args(tiny_sft, path, "--out-dir", str(out), *flags))
    assert stopped.value.code == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert message in lines[-1], lines
    assert len(lines) == 1 or lines[-1].startswith("usage") or "argument --beta" in lines[-1]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json"]
    assert (out / "eval.json").read_text() == "{}"


def test_two_process_torchrun_matches_one_process(tiny_sft, tmp_path):
    from tests.conftest import torchrun
    path = write_rows(tmp_path / "prefs.jsonl", synthetic_rows(64, 3))
    args = dpo_args(tiny_sft, path, "--no-behaviour-eval", "--batch-size", "8",
                    "--micro-batch", "2", "--eval-every", "2")
    dpo.main(args + ["--out-dir", str(tmp_path / "one")])
    torchrun("dpo.py", args + ["--out-dir", str(tmp_path / "two")])
    one, two = ({r["step"]: (r["loss"], r.get("val_accuracy")) for r in
                 map(json.loads, open(tmp_path / d / "log.jsonl"))} for d in ("one", "two"))
    assert sorted(two) == sorted(one) == list(range(1, 8))
    for step in one:
        assert two[step][0] == pytest.approx(one[step][0], rel=1e-4), step
        assert two[step][1] == one[step][1], step
