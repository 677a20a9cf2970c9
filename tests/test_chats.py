"""Tests for data/chats.py: the bundled SFT chats (training entities only, well-formed,
deterministic, the documented mix of annotator styles, system rules mostly obeyed) and the
held-out eval prompts."""
import collections

import pytest

from data import chats, teacher, world


@pytest.fixture(scope="module")
def records():
    return chats.sft_records(seed=0)  # the default training set, ~0.05 s


def _turns(record):
    """(prompt messages, assistant reply, turn info) for each question/answer turn."""
    msgs = record["messages"]
    users = [i for i, m in enumerate(msgs) if m["role"] == "user"]
    return [(msgs[:u + 1], msgs[u + 1]["content"], t) for u, t in zip(users, record["turns"])]


def test_training_chats_use_training_entities_only(records):
    seen = set()
    for rec in records:
        for prompt, _, turn in _turns(rec):
            assert not world.is_heldout(turn["entity"]), turn
            item = teacher.lookup(prompt)  # the question really is about that entity
            assert (item["kind"], item["entity"], item["gold"]) == (
                turn["kind"], turn["entity"], turn["gold"])
            seen.add((turn["kind"], turn["entity"]))
    # every training fact is asked about, no held-out one
    assert seen == {(kind, row["name"]) for kind, row, _, _ in chats.facts("train")}


def test_eval_prompts_use_heldout_entities_only_and_are_balanced():
    items = chats.eval_prompts()
    assert all(world.is_heldout(it["entity"]) for it in items)
    assert {it["kind"] for it in items} == set(chats.KINDS)
    per = collections.Counter(it["behaviour"] for it in items)
    assert set(per) == set(chats.BEHAVIOURS) and min(per.values()) >= 60
    assert max(per.values()) - min(per.values()) <= 1
    assert len({(it["kind"], it["entity"]) for it in items}) == len(items)  # every fact once
    for it in items:
        assert set(it) == {"messages", "kind", "entity", "gold", "behaviour"}
        assert it["messages"][-1]["role"] == "user"
        assert (it["messages"][0]["role"] == "system") == (it["behaviour"] != "none")
        assert teacher.lookup(it["messages"]) == it
    train = chats.eval_prompts("train")
    assert not any(world.is_heldout(it["entity"]) for it in train)
    assert len(chats.eval_prompts(n=20)) == 20 and len(chats.eval_prompts(n=600)) == 600
    assert collections.Counter(it["behaviour"] for it in chats.eval_prompts(n=40)) == {
        b: 10 for b in chats.BEHAVIOURS}
    with pytest.raises(ValueError):
        chats.eval_prompts("test")


def test_deterministic():
    assert chats.sft_chats(seed=1, n=300) == chats.sft_chats(seed=1, n=300)
    assert chats.sft_chats(seed=1, n=300) != chats.sft_chats(seed=2, n=300)
    assert chats.eval_prompts() == chats.eval_prompts()
    assert chats.sft_chats(n=50) == [r["messages"] for r in chats.sft_records(n=50)]


def test_roles_alternate_and_contents_are_not_empty(records):
    assert len(records) == chats.DEFAULT_N
    for rec in records:
        msgs = rec["messages"]
        roles = [m["role"] for m in msgs]
        if roles[0] == "system":
            roles = roles[1:]
        assert roles == ["user", "assistant"] * (len(roles) // 2) and roles, msgs
        assert all(set(m) == {"role", "content"} and m["content"].strip() for m in msgs)
        assert (msgs[0]["role"] == "system") == (rec["behaviour"] != "none")
    multi = sum(len(r["turns"]) == 2 for r in records) / len(records)
    assert abs(multi - chats.MULTI_TURN) < 0.03
    none = sum(r["behaviour"] == "none" for r in records) / len(records)
    assert abs(none - chats.BEHAVIOUR_MIX["none"]) < 0.03


def test_phrasings_include_the_world_question_and_cover_the_kinds():
    assert set(chats.KINDS) >= {"capital", "continent", "currency", "language", "symbol",
                                "atomic_number", "state_capital", "statehood"}
    for kind in chats.KINDS:
        assert chats.PHRASINGS[kind][0] == world.QUESTIONS[kind][1]
        assert len(set(chats.PHRASINGS[kind])) >= 5


def test_style_mix_matches_the_constants(records):
    assert abs(sum(chats.STYLE_MIX.values()) - 1) < 1e-9
    styles = collections.Counter(t["style"] for r in records if r["behaviour"] == "none"
                                 for t in r["turns"])
    total = sum(styles.values())
    for style, p in chats.STYLE_MIX.items():
        assert abs(styles[style] / total - p) < 0.03, (style, styles[style] / total, p)


def test_the_teacher_sees_the_styles(records):
    for rec in records[:1500]:
        for prompt, reply, turn in _turns(rec):
            j = teacher.judge(teacher.lookup(prompt), reply, True)
            style = turn["style"]
            assert j["correct"] == (style != "wrong") and j["wrong"] == (style == "wrong"), reply
            assert j["filler"] == (style == "filler"), reply
            assert j["flattery"] == (style == "flattery"), reply


def test_system_demonstrations_mostly_comply(records):
    by_rule = collections.defaultdict(list)
    for rec in records:
        if rec["behaviour"] != "none":
            for prompt, reply, _ in _turns(rec):
                item = teacher.lookup(prompt)
                assert item["behaviour"] == rec["behaviour"]
                by_rule[rec["behaviour"]].append(teacher.judge(item, reply, True)["follows_system"])
    assert set(by_rule) == {"one_word", "sentence", "uppercase"}
    for rule, ok in by_rule.items():
        assert 0.85 <= sum(ok) / len(ok) <= 0.95, (rule, sum(ok) / len(ok))


def test_every_system_wording_is_recognised():
    for behaviour, wordings in chats.SYSTEM_RULES.items():
        for w in wordings:
            for persona in [""] + chats.PERSONAS:
                assert teacher.behaviour_of((persona + " " + w).strip()) == behaviour, w
    assert teacher.behaviour_of(None) == "none"


def test_plain_prompt():
    sys_user = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "What is the capital of France?"}]
    assert chats.plain_prompt(sys_user) == "Answer in one word.\nWhat is the capital of France?\n"
    assert chats.plain_prompt(sys_user[1:]) == "What is the capital of France?\n"
    item = chats.eval_prompts(n=1)[0]
    assert chats.plain_prompt(item["messages"]).endswith(item["messages"][-1]["content"] + "\n")
