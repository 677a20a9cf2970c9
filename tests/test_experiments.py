"""Tests for experiments/: best-of-n's bookkeeping on real samples, the domain-expert run end to
end with the tiny models (same batches for every start, its scores), and one-line errors."""
import csv
import json
import math

import pytest
import torch

from data import world
from experiments import compare_rl, domain_expert, overoptimization, sycophancy


def test_best_of_n_keeps_the_proxys_favourite_and_the_kl_bound(tiny_sft, tiny_reward):
    a = overoptimization.parse_args(["--sft", tiny_sft, "--prompts", "6", "--max-n", "8",
                                     "--max-new-tokens", "8", "--device", "cpu"])
    points = overoptimization.best_of_n(a, tiny_reward)
    assert [p["n_or_update"] for p in points] == [1, 2, 4, 8]
    for p in points:
        assert p["kl"] == pytest.approx(math.log(p["n_or_update"]) - 1 + 1 / p["n_or_update"])
    # the best of the first n is among the first 2n: the proxy's mean never falls as n grows
    proxies = [p["proxy"] for p in points]
    assert proxies == sorted(proxies) and proxies[-1] > proxies[0]


def test_best_of_n_with_the_teacher_picking_never_falls_and_bounds_the_reward_models(tiny_sft,
                                                                                    tiny_reward):
    args = compare_rl.parse_args(["--sft", tiny_sft, "--reward", tiny_reward, "--max-n", "4",
                                  "--device", "cpu"])
    curves = compare_rl.best_of_n(args, temperature=1.0, max_new_tokens=6)
    assert [c["n"] for c in curves] == [1, 2, 4]
    teacher = [c["gold_teacher_picks"] for c in curves]
    assert teacher == sorted(teacher) and teacher[-1] > teacher[0]  # the best of more answers
    assert curves[0]["gold_reward_model_picks"] == pytest.approx(teacher[0])  # n = 1: no choice
    assert all(c["gold_reward_model_picks"] <= c["gold_teacher_picks"] + 1e-6 for c in curves)
    assert curves[2]["kl"] == pytest.approx(math.log(4) - 3 / 4)


def test_as_many_prompts_gives_grpo_ppos_prompts_per_update(monkeypatch, tmp_path):
    calls = []
    monkeypatch.setattr(compare_rl, "run_stage", lambda script, out, device, *flags:
                        calls.append((script, flags)))
    monkeypatch.setattr(compare_rl, "load_checkpoint", lambda folder, stages: (
        None, None, {"config": {"rollout_batch": 48, "updates": 30}}))
    for many, expected in ((False, [None, None]), (True, ["48", "30"])):
        calls.clear()
        compare_rl.train_all(compare_rl.parse_args(["--out-dir", str(tmp_path)] + (
            ["--as-many-prompts"] if many else [])))
        assert [script for script, _ in calls] == ["ppo.py", "dpo.py", "grpo.py", "grpo.py"]
        for script, flags in calls:
            given = [flags[flags.index(f) + 1] if f in flags else None
                     for f in ("--rollout-batch", "--updates")]
            assert given == (expected if script == "grpo.py" else [None, None]), script


def test_training_curves_are_running_means_and_dpos_validations(tmp_path):
    """PPO and GRPO: each update's rollout figures, means over the last `window` updates; DPO:
    only its validation lines, where it sampled the held-out prompts."""
    folders = {}
    for name in compare_rl.METHODS:
        folders[name] = tmp_path / name
        folders[name].mkdir()
        if name == "dpo":
            lines = [{"step": 1, "loss": 0.7}, {"step": 2, "loss": 0.6, "val_loss": 0.6,
                                                "sampled_gold_score": 0.5,
                                                "sampled_kl_to_sft": 0.25}]
        else:
            lines = [{"step": step, "kl": kl, "gold_score": gold}
                     for step, (kl, gold) in enumerate([(0.0, 0.2), (1.0, 0.4), (4.0, 0.9)], 1)]
        (folders[name] / "log.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    curves = compare_rl.training_curves(folders, window=2)
    assert curves["dpo"] == [(0.5, 0.5)]
    expected = [(0.0, 0.2), (math.sqrt(0.5), 0.3), (math.sqrt(2.5), 0.65)]
    for name in ("ppo", "grpo_teacher", "grpo_reward"):
        assert curves[name] == [pytest.approx(point) for point in expected]


@pytest.mark.parametrize("script,args,message", [
    (overoptimization, ["--max-n", "48"], "--max-n 48: use a power of 2"),
    (overoptimization, ["--sft", "nowhere"], "--sft nowhere: no finished SFT run there"),
    (sycophancy, ["--sft", "nowhere"], "--sft nowhere: no finished run there"),
    (compare_rl, ["--max-n", "12"], "--max-n 12: use a power of 2"),
    (compare_rl, ["--sft", "nowhere"], "--sft nowhere: no finished run there"),
])
def test_bad_input_gets_one_line(script, args, message, tmp_path, capsys):
    with pytest.raises(SystemExit) as stopped:
        script.main(args + ["--out-dir", str(tmp_path)])
    assert stopped.value.code == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_sycophancy_never_mixes_reward_models_that_score_differently(tmp_path):
    from ground import UserError
    (tmp_path / "eval.json").write_text(json.dumps({"stage": "reward"}))  # before --score: a head
    sycophancy.check_scoring(str(tmp_path), "head")
    with pytest.raises(UserError, match="made with --score head, not likelihood"):
        sycophancy.check_scoring(str(tmp_path), "likelihood")
    sycophancy.check_scoring(str(tmp_path / "not-made-yet"), "likelihood")


def test_domain_expert_runs_every_start_on_the_same_batches(tiny_base, tiny_sft, tmp_path):
    out = tmp_path / "de"
    domain_expert.main(["--preset", "tiny", "--base", tiny_base, "--sft", tiny_sft, "--ppo",
                        str(tmp_path / "none"), "--out-dir", str(out), "--device", "cpu"])
    with open(out / "curves.csv") as f:
        rows = list(csv.DictReader(f))
    starts = {r["start"] for r in rows}
    assert {"base", "sft"} <= starts and "ppo" not in starts
    for start in {"base", "sft"}:
        assert sorted({int(r["step"]) for r in rows if r["start"] == start}) == [0, 2, 4]
    assert all(0 <= float(r[k]) <= 1 for r in rows for k in ("exact", "execution", "chatty"))
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 4 and set(summary["final"]) == starts
    assert (out / "table.md").read_text().count("\n") == len(starts) + 2
    a = domain_expert.parse_args(["--preset", "tiny"])
    examples = [([1, 2, 3], [-1, 2, 3]), ([4, 5], [-1, 5])]
    runs = [list(domain_expert.batches(examples, a, domain_expert.PRESETS["tiny"], 0, "cpu"))
            for _ in range(2)]
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(*runs))


def test_domain_expert_scores():
    facts = world.load_facts()
    item = ("What is the capital of France?", 'countries | name = "France" | pick capital',
            ["Paris"])
    other_right = 'countries | capital = "Paris" | pick capital'
    got = domain_expert.score([(' countries | name = "France" | pick capital', False),
                               (other_right, False), ("The capital of France is Paris.", False),
                               ('countries | name = "France" | pick capitol', True)],
                              [item] * 4, facts)
    assert got == {"exact": 0.25, "execution": 0.5, "chatty": 0.5}
    assert domain_expert.score([(other_right, True)], [item], facts, count_end=False)["chatty"] == 0


@pytest.mark.parametrize("write,flag,message", [
    ('{"question": "q", "query": "countries | count"}\nnot json\n', "--pairs", "pairs.jsonl:2: "
     "not valid JSON"),
    ('{"question": "q", "query": "countries | count"}\n[1]\n', "--pairs", "pairs.jsonl:2: "
     'expected {"question": ..., "query": ...}'),
    ('{"question": "q", "query": "countries | pick capitol"}\n', "--pairs",
     "pairs.jsonl:1: query: column 18: expected a field of countries"),
    ("Write queries.\nQ: How many?\nQuery: countries | count\nQuery: planets | count\n", "--spec",
     "pairs.jsonl:4: column 1: no table 'planets'"),
    ("Write queries.\n", "--spec", "pairs.jsonl: no 'Query: ...' line"),
])
def test_domain_expert_bad_files_get_one_line(tiny_base, tiny_sft, tmp_path, capsys, write, flag,
                                              message):
    path = tmp_path / "pairs.jsonl"
    path.write_text(write)
    with pytest.raises(SystemExit):
        domain_expert.main(["--preset", "tiny", "--base", tiny_base, "--sft", tiny_sft, flag,
                            str(path), "--out-dir", str(tmp_path / "x"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err


def test_domain_expert_refuses_starts_of_two_tokenizers(tiny_sft, tmp_path, capsys):
    import pretrain
    from data import prepare
    (tmp_path / "t.txt").write_text("a completely different corpus " * 2000)
    prepare.prepare(str(tmp_path / "data"), inputs=[str(tmp_path / "t.txt")], vocab_size=300,
                    quiet=True)
    base = str(tmp_path / "base")
    pretrain.main(["--preset", "tiny", "--device", "cpu", "--no-behaviour-eval", "--data",
                   str(tmp_path / "data"), "--out-dir", base, "--steps", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit):
        domain_expert.main(["--preset", "tiny", "--base", base, "--sft", tiny_sft,
                            "--out-dir", str(tmp_path / "x"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert f"--sft {tiny_sft} has another tokenizer than --base" in err, err


def test_domain_expert_trains_on_the_query_and_its_end_only(tiny_sft):
    from checkpoints import load_checkpoint
    _, tok, _ = load_checkpoint(tiny_sft)
    pair = ("What is the capital of France?", 'countries | name = "France" | pick capital')
    for chat, end in ((False, "\n"), (True, "<|end|>")):
        (ids, targets), = domain_expert.encode_pairs(tok, [pair], 128, chat)
        assert len(ids) == len(targets)
        trained = [t for t in targets if t != -1]
        assert tok.decode(trained) == " " + pair[1] + end  # chat: encode_turn's space
        first = targets.index(trained[0])  # the position that predicts the query's first token
        assert tok.decode(ids[:first + 1]).endswith("Query:" if not chat else "<|assistant|>")
