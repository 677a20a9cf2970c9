"""The knowledge audit: which held-out facts the base model knows (3-shot, the corpus's Q/A form),
and every later figure split by it."""
import json
import os
import shutil

import pytest

import evaluation
import reward
from checkpoints import TOKENIZER_FILE
from data import chats, world
from data.tokenizer import Tokenizer


class QuizTaker:
    """A stand-in base model that reads its prompt back: it answers right exactly the questions
    of one kind, and records every prompt it was given."""

    def __init__(self, tok, kind):
        self.tok, self.kind, self.prompts, self.training = tok, kind, [], True
        self.config = type("Config", (), {"block_size": 512})
        self.key = {world.ask(k, row)[0]: (k, world.ask(k, row)[1])
                    for k, row, _, _ in chats.facts("heldout")}

    def eval(self):
        self.training = False

    def train(self, mode=True):
        self.training = mode

    def generate(self, prompts, max_new, **_):
        out = []
        for ids in prompts:
            text = self.tok.decode(ids[1:])
            self.prompts.append(text)
            kind, gold = self.key[text.rsplit("Q: ", 1)[1][:-len("\nA:")]]
            said = gold if kind == self.kind else "Atlantis"
            out.append(self.tok.encode(f" {said}\n\nQ: What")[:max_new])
        return out


def test_the_audit_asks_each_held_out_fact_three_shot_and_reads_the_first_line(small_data):
    tok = Tokenizer.load(os.path.join(small_data, TOKENIZER_FILE))
    base = QuizTaker(tok, "currency")
    audit = evaluation.knowledge_audit(base, tok, batch_size=50)
    facts = chats.facts("heldout")
    assert [(f["kind"], f["entity"]) for f in audit] == [(k, r["name"]) for k, r, _, _ in facts]
    assert [f["known"] for f in audit] == [k == "currency" for k, _, _, _ in facts]
    assert all(f["answer"] == (f["gold"] if f["known"] else "Atlantis") for f in audit)
    assert base.training  # left as it was found
    train_qa = {world.ask(k, row) for k, row, _, _ in chats.facts("train")}
    for prompt, (kind, row, _, _) in zip(base.prompts, facts):
        shots = prompt.split("\n\n")[:-1]
        assert len(shots) == 3 and prompt.endswith(f"Q: {world.ask(kind, row)[0]}\nA:")
        for shot in shots:  # examples of the same kind about training entities, answered
            question, answer = shot[len("Q: "):].split("\nA: ")
            assert (question, answer) in train_qa
            assert world.QUESTIONS[kind][1].split("{")[0] in question
    summary = evaluation.audit_summary(audit)
    assert summary["known"] == sum(k == "currency" for k, _, _, _ in facts)
    assert summary["known_rate_by_kind"]["currency"] == 1.0
    assert summary["known_rate_by_kind"]["capital"] == 0.0


def test_verdicts_split_by_what_the_base_model_knows():
    items = [{"kind": "capital", "entity": "A", "behaviour": "none"},
             {"kind": "capital", "entity": "B", "behaviour": "one_word"},
             {"kind": "capital", "entity": "C", "behaviour": "none"},
             {"kind": "symbol", "entity": "D", "behaviour": "none"},
             {"kind": "capital", "entity": "E", "behaviour": "none"}]  # not audited: left out
    verdicts = [{"correct": c} for c in (True, False, True, False, True)]
    known = {("capital", "A"): True, ("capital", "B"): True, ("capital", "C"): False,
             ("symbol", "D"): False}
    split = evaluation.by_knowledge(items, verdicts, known)
    assert split["base_knows"] == {"n": 2, "accuracy": 0.5, "accuracy_none": 1.0,
                                   "accuracy_one_word": 0.0}
    assert split["base_does_not_know"] == {"n": 2, "accuracy": 0.5, "accuracy_none": 0.5}


def test_the_audit_travels_from_sft_to_the_reward_models_split(tiny_sft, tmp_path):
    # a tiny model knows nothing: an audit that marks a third of the facts known, to split by
    audit = [{"kind": kind, "entity": row["name"], "gold": gold, "answer": "", "known": i % 3 == 0}
             for i, (kind, row, _, gold) in enumerate(chats.facts("heldout"))]
    sft_dir = tmp_path / "sft"
    shutil.copytree(tiny_sft, sft_dir)
    evaluation.write_knowledge(str(sft_dir), audit, "a base model")
    assert evaluation.read_known(str(sft_dir)) == evaluation.known_map(audit)
    out = tmp_path / "reward"
    reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", str(sft_dir),
                 "--out-dir", str(out), "--prompts", "32"])
    assert evaluation.read_known(str(out)) == evaluation.known_map(audit)  # beside its figures
    held = json.loads((out / "eval.json").read_text())["heldout"]
    split = held["fact_pairs_by_knowledge"]
    assert split["base_knows"]["pairs"] + split["base_does_not_know"]["pairs"] == \
        held["by_difference"]["fact"]["pairs"]  # every held-out prompt is an audited fact


def test_a_broken_knowledge_file_is_one_line(tmp_path):
    (tmp_path / evaluation.KNOWLEDGE_FILE).write_text('{"facts": [{"kind": "capital"}]}')
    with pytest.raises(evaluation.UserError, match="not a knowledge audit"):
        evaluation.read_known(str(tmp_path))
    assert evaluation.read_known(str(tmp_path / "nowhere")) is None


def test_the_reward_models_fact_pairs_split_by_knowledge(monkeypatch):
    items = chats.eval_prompts("heldout")[:6]
    answers = [[(f"I think it is {it['gold']}.", True), ("I think it is Atlantis.", True)]
               for it in items]
    verdicts = [[evaluation.teacher.judge(it, text, ended) for text, ended in options]
                for it, options in zip(items, answers)]
    known = {(it["kind"], it["entity"]): i % 2 == 0 for i, it in enumerate(items)}
    # a reward model that ranks the right answer first exactly where the base model knows it
    scores = [s for it in items for s in ((1.0, 0.0) if known[it["kind"], it["entity"]]
                                          else (0.0, 1.0))]
    monkeypatch.setattr(evaluation, "reward_scores", lambda *args, **kw: scores)
    result = evaluation.evaluate_reward_model(None, Stub(), (items, answers, verdicts), "cpu",
                                              known=known)
    assert result["by_difference"]["fact"] == {"pairs": 6, "accuracy": 0.5}
    assert result["fact_pairs_by_knowledge"] == {"base_knows": {"pairs": 3, "accuracy": 1.0},
                                                 "base_does_not_know": {"pairs": 3,
                                                                        "accuracy": 0.0}}


class Stub:
    """A tokenizer for evaluate_reward_model with reward_scores replaced: ids are never read."""
    pad_id = 0

    def render_chat(self, messages, for_completion=False):
        return [1], [0]

    def encode_turn(self, text):
        return [2]

    def special(self, name):
        return 3
