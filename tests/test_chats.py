"""Tests for data/chats.py and data/wordings.py: the bundled SFT chats (training entities and
trained wordings only, well-formed, deterministic, the documented mix of annotator styles, claims
and requests out of scope, system rules mostly obeyed) and the held-out eval prompts."""
import collections
import random

import pytest

from data import chats, teacher, wordings, world


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
            item = teacher.lookup(prompt)  # the question really is about that entity
            assert (item["kind"], item["entity"], item["gold"], item["claim"]) == (
                turn["kind"], turn["entity"], turn["gold"], turn["claim"]), prompt
            if turn["kind"] != "out_of_scope":
                assert not world.is_heldout(turn["entity"]), turn
                seen.add((turn["kind"], turn["entity"]))
    # every training fact is asked about, no held-out one
    assert seen == {(kind, row["name"]) for kind, row, _, _ in chats.facts("train")}


def test_training_chats_use_trained_wordings_only(records):
    """Every question of the SFT data is a trained wording (hundreds per kind), none a held-out
    one; no held-out claim frame or request out of scope appears."""
    trained = {k: set(wordings.wordings(k, "train")) for k in chats.KINDS}
    heldout = {k: set(wordings.wordings(k, "heldout")) for k in chats.KINDS}
    names = {(k, row["name"]): x for k, row, x, _ in chats.facts("train")}
    for rec in records:
        for n, (prompt, _, turn) in enumerate(_turns(rec)):
            if turn["claim"] is not None or turn["kind"] == "out_of_scope":
                continue
            text, x = prompt[-1]["content"], names[turn["kind"], turn["entity"]]
            if n == 1 and text in wordings.FOLLOW_UPS[turn["kind"]]:  # names no entity
                assert turn["entity"] == rec["turns"][0]["entity"]  # (a second question may
                continue  # be about the same entity by chance: it is checked below)
            template = text.replace(x, "{X}")  # the name as written, whatever the casing
            assert template in trained[turn["kind"]] and template not in heldout[turn["kind"]]
    for kind in chats.KINDS:
        assert len(trained[kind]) >= 1000 and len(heldout[kind]) >= 500
    users = {m["content"] for r in records for m in r["messages"] if m["role"] == "user"}
    for sort, (_, held) in wordings.OUT_OF_SCOPE.items():
        assert not users & set(held), sort


def test_the_teacher_reads_every_wording_back():
    """teacher.lookup finds kind, entity and answer in every generated wording (trained and
    held-out, any casing, ending or typo; a sample of them) about every kind of entity, including
    names inside other names (Niger/Nigeria, Mexico/New Mexico) and Georgia the country and the
    state, also when a person types the name in another case."""
    rng = random.Random(0)
    for kind in chats.KINDS:
        pool = chats.facts("train") + chats.facts("heldout")
        facts = [f for f in pool if f[0] == kind]
        hard = [f for f in facts if f[1]["name"] in {"Georgia", "Niger", "Mexico", "New Mexico",
                                                     "Guinea", "Iodine", "Tin", "Indium",
                                                     "West Virginia", "Republic of the Congo"}]
        for split in ("train", "heldout"):
            for wording in rng.sample(wordings.wordings(kind, split), 300):
                for _, row, x, gold in hard + rng.sample(facts, 1):
                    for name in (x, x.upper(), x.lower()):  # as a person might type it
                        item = teacher.lookup([{"role": "user",
                                                "content": wording.replace("{X}", name)}])
                        assert (item["kind"], item["entity"], item["gold"], item["claim"]) == (
                            kind, row["name"], gold, None), wording.replace("{X}", name)


def test_claims_and_follow_ups_are_read_back():
    rng = random.Random(0)
    for kind, row, x, gold in chats.facts("train") + chats.facts("heldout"):
        for claimed in [gold, rng.choice(chats.wrong_claims(kind, gold))]:
            for _ in range(4):  # several of the frames and statements
                text = wordings.claim(rng, kind, x, claimed)
                item = teacher.lookup([{"role": "user", "content": text}])
                assert (item["kind"], item["entity"], item["gold"], item["claim"]) == (
                    kind, row["name"], gold, claimed), text
    items = chats.follow_up_prompts("heldout") + chats.claim_prompts("heldout")
    for it in items:
        assert teacher.lookup(it["messages"]) == it
        assert world.is_heldout(it["entity"])
    follow = chats.follow_up_prompts("heldout")
    assert len(follow) >= 250 and all(len(it["messages"]) == 3 for it in follow)
    assert not any(wordings.entities_in(it["messages"][-1]["content"]) for it in follow)
    claims = chats.claim_prompts("heldout")
    wrong = sum(it["claim"] != it["gold"] for it in claims)
    assert abs(wrong - len(claims) / 2) <= 1


def test_eval_prompts_use_heldout_entities_only_and_are_balanced():
    items = chats.eval_prompts()
    assert all(world.is_heldout(it["entity"]) for it in items)
    assert {it["kind"] for it in items} == set(chats.KINDS)
    per = collections.Counter(it["behaviour"] for it in items)
    assert set(per) == set(chats.BEHAVIOURS) and min(per.values()) >= 60
    assert max(per.values()) - min(per.values()) <= 1
    assert len({(it["kind"], it["entity"]) for it in items}) == len(items)  # every fact once
    for it in items:
        assert set(it) == {"messages", "kind", "entity", "gold", "claim", "behaviour"}
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
    new = chats.eval_prompts(wording="heldout")  # the same facts and behaviours, new wordings
    assert [(it["kind"], it["entity"], it["behaviour"]) for it in new] == [
        (it["kind"], it["entity"], it["behaviour"]) for it in items]
    assert all(teacher.lookup(it["messages"]) == it for it in new)
    assert not {it["messages"][-1]["content"] for it in new} & {
        it["messages"][-1]["content"] for it in items}


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
    first = collections.Counter(
        "out_of_scope" if r["turns"][0]["kind"] == "out_of_scope" else
        "claim" if r["turns"][0]["claim"] is not None else "question" for r in records)
    for what, share in chats.CHAT_MIX.items():
        assert abs(first[what] / len(records) - share) < 0.02, what
    questions = [r for r in records if r["turns"][0]["claim"] is None
                 and r["turns"][0]["kind"] != "out_of_scope"]
    multi = [r for r in questions if len(r["turns"]) == 2]
    assert abs(len(multi) / len(questions) - chats.MULTI_TURN) < 0.03
    follow = sum(r["turns"][0]["entity"] == r["turns"][1]["entity"] for r in multi) / len(multi)
    assert abs(follow - chats.FOLLOW_UP) < 0.1
    none = sum(r["behaviour"] == "none" for r in questions) / len(questions)
    assert abs(none - chats.BEHAVIOUR_MIX["none"]) < 0.03


def test_cores_include_the_world_question_and_cover_the_kinds():
    assert set(chats.KINDS) == set(wordings.TABLE_OF)
    for kind in chats.KINDS:
        assert wordings.CORES[kind][0][0] == world.QUESTIONS[kind][1]
        assert not set(wordings.CORES[kind][0]) & set(wordings.CORES[kind][1])


def test_style_mix_matches_the_constants(records):
    assert abs(sum(chats.STYLE_MIX.values()) - 1) < 1e-9
    styles = collections.Counter(t["style"] for r in records if r["behaviour"] == "none"
                                 for t in r["turns"] if t["style"] in chats.STYLE_MIX)
    total = sum(styles.values())
    for style, p in chats.STYLE_MIX.items():
        assert abs(styles[style] / total - p) < 0.03, (style, styles[style] / total, p)


def test_the_teacher_sees_the_styles(records):
    for rec in records:
        for prompt, reply, turn in _turns(rec):
            j = teacher.judge(teacher.lookup(prompt), reply, True)
            style, claimed = turn["style"], turn["claim"]
            if turn["kind"] == "out_of_scope":  # a greeting or the assistant's scope, no fact
                assert j["correct"] and not j["wrong"] and not j["filler"], reply
            elif claimed is not None:  # honest: confirm or correct; sycophantic: agree
                agrees = style == "sycophantic" or claimed == turn["gold"]
                lies = style == "sycophantic" and claimed != turn["gold"]
                assert j["agrees_with_claim"] == agrees, (prompt, reply)
                assert j["correct"] == (not lies) and j["wrong"] == lies, (prompt, reply)
            else:
                assert j["correct"] == (style != "wrong"), reply
                assert j["wrong"] == (style == "wrong"), reply
                assert j["filler"] == (style == "filler"), reply
                assert j["flattery"] == (style == "flattery"), reply
                assert j["agrees_with_claim"] is None


def test_claims_are_half_right_and_mostly_answered_honestly(records):
    turns = [t for r in records for t in r["turns"] if t["claim"] is not None]
    assert len(turns) > 500
    wrong = [t for t in turns if t["claim"] != t["gold"]]
    assert abs(len(wrong) / len(turns) - 0.5) < 0.05
    sycophantic = sum(t["style"] == "sycophantic" for t in wrong) / len(wrong)
    assert abs(sycophantic - chats.SYCOPHANCY) < 0.05


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


def test_an_answer_in_capitals_is_the_answer_alone_unless_it_is_a_number(records):
    """Restating the question in capitals garbles its names (README: the SFT ablations), so a
    compliant reply in capitals is the fact alone; a number has no letters, so it gets a
    sentence."""
    replies = [(turn, reply) for rec in records for _, reply, turn in _turns(rec)
               if turn["style"] == "uppercase"]
    assert len(replies) > 200
    for turn, reply in replies:
        if any(c.isalpha() for c in turn["gold"]):
            assert reply.rstrip(".") == turn["gold"].upper(), reply
        else:
            assert reply == reply.upper() and len(reply.split()) > 3, reply


def test_every_system_wording_is_recognised():
    for behaviour, rules in chats.SYSTEM_RULES.items():
        for w in rules:
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


def test_the_judged_sets_ask_every_fact_under_every_behaviour_and_recased():
    from evaluation import instruct_eval_sets
    sets = instruct_eval_sets()
    facts = {(k, r["name"]) for k, r, _, _ in chats.facts("heldout")}
    for name in ("heldout", "heldout_new_wordings", "heldout_recased"):
        asked = collections.Counter((it["kind"], it["entity"], it["behaviour"])
                                    for it in sets[name])
        assert set(asked) == {(*f, b) for f in facts for b in chats.BEHAVIOURS}
        assert set(asked.values()) == {1}
    # the recased set is the new-wordings set typed in one case, the entity's name included
    changed = 0
    for new, recased in zip(sets["heldout_new_wordings"], sets["heldout_recased"]):
        asked, typed = new["messages"][-1]["content"], recased["messages"][-1]["content"]
        assert typed in (asked.lower(), asked.upper())
        assert new["messages"][:-1] == recased["messages"][:-1]
        changed += typed != asked
    assert changed > 0.8 * len(sets["heldout_recased"])
    assert {it["messages"][-1]["content"] for it in sets["heldout_recased"][::2]} == {
        it["messages"][-1]["content"].lower() for it in sets["heldout_new_wordings"][::2]}
    scope = sets["out_of_scope_new_wordings"]
    texts = [it["messages"][0]["content"] for it in scope]
    assert len(scope) == 4 * len(chats.out_of_scope_prompts()) and len(set(texts)) > 90
    trained = {t for sort in wordings.OUT_OF_SCOPE.values() for t in sort[0]}
    assert not set(texts) & trained
