"""Tests for data/world.py: the bundled fact tables, the held-out split, the generated world
documents (determinism, paraphrases, questions without answers, correct answer keys), the
base-model eval helpers and the Shakespeare loader."""
import random
import re

import pytest

from data import world

FACTS = world.load_facts()
REQUIRED = {"countries": ["name", "capital", "continent", "subregion", "currency", "language",
                          "languages", "population"],
            "elements": ["name", "symbol", "atomic_number", "atomic_mass", "period", "block",
                         "category"],
            "us_states": ["name", "abbreviation", "capital", "statehood_year"]}


@pytest.fixture(scope="module")
def typed_docs():
    return world.world_documents_typed(seed=0)  # the default corpus, ~0.3 s


def test_tables_load_with_expected_rows_and_no_empty_required_fields():
    assert 190 <= len(FACTS["countries"]) <= 250
    assert len(FACTS["elements"]) == 118
    assert len(FACTS["us_states"]) == 50
    for table, fields in REQUIRED.items():
        names = [r["name"] for r in FACTS[table]]
        assert len(set(names)) == len(names), table
        for row in FACTS[table]:
            for f in fields:
                assert row[f] not in ("", None, []), (table, row["name"], f)
    assert [e["atomic_number"] for e in FACTS["elements"]] == list(range(1, 119))
    by_name = {r["name"]: r for t in world.TABLES for r in FACTS[t]}
    assert by_name["France"]["capital"] == "Paris" and by_name["Gold"]["symbol"] == "Au"
    assert by_name["Ohio"]["capital"] == "Columbus" and by_name["Hawaii"]["statehood_year"] == 1959
    assert all("/" not in c["capital"] and ";" not in c["capital"] for c in FACTS["countries"])


def test_neighbours_are_countries_in_the_table_and_symmetric():
    countries = {c["name"]: c for c in FACTS["countries"]}
    for c in countries.values():
        for n in c["neighbours"]:
            assert n in countries and n != c["name"], (c["name"], n)
            assert c["name"] in countries[n]["neighbours"], (c["name"], n)
    assert set(countries["France"]["neighbours"]) >= {"Belgium", "Germany", "Spain"}
    assert countries["Japan"]["neighbours"] == []


def test_heldout_split_is_stable_disjoint_and_about_a_quarter():
    # hard-coded: the split must never move (SFT and its evaluation depend on it)
    assert world.is_heldout("France") and world.is_heldout("Brazil") and world.is_heldout("Ohio")
    assert not world.is_heldout("Japan") and not world.is_heldout("Gold")
    assert not world.is_heldout("Texas")
    for table in world.TABLES:
        train, heldout = world.split(FACTS[table])
        assert len(train) + len(heldout) == len(FACTS[table])
        assert not {r["name"] for r in train} & {r["name"] for r in heldout}
        assert 0.15 <= len(heldout) / len(FACTS[table]) <= 0.35, table
        assert all(world.is_heldout(r["name"]) for r in heldout)


def test_same_seed_same_bytes_different_seed_different():
    a = world.world_documents(seed=3, copies=2)
    assert a == world.world_documents(seed=3, copies=2)
    assert "\x00".join(a).encode() == "\x00".join(world.world_documents(seed=3, copies=2)).encode()
    assert a != world.world_documents(seed=4, copies=2)


def test_default_world_size_and_mix(typed_docs):
    size = {}
    for kind, text in typed_docs:
        assert text.strip()
        size[kind] = size.get(kind, 0) + len(text.encode())
    total = sum(size.values())
    assert 8e6 <= total <= 10e6
    assert size["passage"] > 0.6 * total
    assert 0 < size["answer_key"] < 0.05 * total
    # the mix as data/world.py's comment on _PER_COPY states it
    questions = size["quiz"] + size["forum"] + size["questions"]
    assert 0.22 < questions / total < 0.30 and 0.02 < size["faq"] / total < 0.06
    assert 0.02 < size["code"] / total < 0.04
    assert world.world_documents(seed=0)[:5] == [t for _, t in typed_docs[:5]]


def fact_sentences(table, row, key):
    """Every paraphrase of one fact, e.g. all the ways the corpus says France's capital."""
    fields = world._fields(table, row)
    return [world._render(template, fields) for template in world.STATEMENTS[key]]


def answer_key():
    """{question: answer} over every kind and entity: the answer key of the whole world."""
    return {q: a for kind in world.QUESTIONS for q, a in world.qa_items(kind)}


def test_every_fact_appears_in_at_least_three_phrasings(typed_docs):
    text = "\n".join(t for k, t in typed_docs if k == "passage")
    rng = random.Random(0)
    for table in world.TABLES:
        for row in rng.sample(FACTS[table], 6) + [FACTS[table][0]]:
            for key in world.facts_of(table, row):
                phrasings = fact_sentences(table, row, key)
                seen = sum(p in text for p in set(phrasings))
                assert seen >= 3, (row["name"], key, seen)
    assert "The capital of France is Paris." in text and "Paris is the capital of France." in text
    assert "The chemical symbol for gold is Au." in text or "Au is the symbol for gold." in text


def test_question_documents_have_questions_and_no_answers(typed_docs):
    qa = answer_key()
    kinds = {"quiz", "forum", "questions"}
    docs = [t for k, t in typed_docs if k in kinds]
    assert len(docs) > 100
    for doc in docs:
        lines = doc.split("\n")
        assert sum(line.endswith("?") for line in lines) >= 3
        # every line is a question, except the title/"Posted by" line, blanks and "Reply from":
        # no room for an answer anywhere
        for line in lines[1:]:
            assert line.endswith("?") or not line or line.startswith("Reply from"), (line, doc)
        assert lines[0].endswith("?") or not any(a == lines[0] for a in qa.values())
    bare = [t for k, t in typed_docs if k == "questions"]
    assert all(all(line in qa for line in d.split("\n")) for d in bare)  # one bare question a line


def test_answer_keys_parse_into_correct_pairs(typed_docs):
    qa = answer_key()
    keys = [t for k, t in typed_docs if k == "answer_key"]
    assert keys
    n = 0
    for doc in keys:
        pairs = re.findall(r"^Q: (.*)\nA: (.*)$", doc, flags=re.M)
        assert pairs and len(pairs) == doc.count("Q: ")
        for q, a in pairs:
            assert qa[q] == a, (q, a)
            n += 1
    assert n > 500
    tables = {world.QUESTIONS[k][0] for k in world.QUESTIONS
              for q, _ in world.qa_items(k) if any(q in d for d in keys)}
    assert tables == set(world.TABLES)  # answer keys draw from every table


def test_question_phrasings_are_shared_and_unambiguous():
    qa = answer_key()
    assert len(qa) == sum(len(world.qa_items(k)) for k in world.QUESTIONS)  # no duplicate question
    assert qa["What is the capital of Georgia?"] == "Tbilisi"
    assert qa["What is the state capital of Georgia?"] == "Atlanta"
    assert qa["What is the capital of the United States?"] == "Washington, D.C."
    caps = world.fewshot_items("capital")
    assert len(caps) == len(FACTS["countries"])
    assert ("What is the capital of France?", "Paris") in caps
    syms = world.fewshot_items("symbol")
    assert len(syms) == 118 and ("What is the chemical symbol for gold?", "Au") in syms
    assert caps == world.fewshot_items("capital")  # stable order


def test_fewshot_prompt_and_answer_round_trip():
    shots = [("What is the capital of Peru?", "Lima"), ("What is the capital of Japan?", "Tokyo")]
    p = world.fewshot_prompt(shots, "What is the capital of France?")
    assert p == ("Q: What is the capital of Peru?\nA: Lima\n\nQ: What is the capital of Japan?\n"
                 "A: Tokyo\n\nQ: What is the capital of France?\nA:")
    assert world.fewshot_answer(" Paris\n\nQ: What is the capital of Spain?\nA: Madrid") == "Paris"
    assert world.fewshot_answer(" Washington, D.C.") == "Washington, D.C."
    assert world.fewshot_answer("") == ""
    for q, a in shots:  # what the model should write reproduces the answer exactly
        assert world.fewshot_answer(" " + a + "\n\n") == a


def test_zero_shot_questions_and_is_question():
    qs = world.zero_shot_questions()
    assert len(qs) >= 50 and len(set(qs)) == len(qs) and qs == world.zero_shot_questions()
    qa = answer_key()
    assert all(q in qa and q.endswith("?") for q in qs)
    assert len({next(k for k in world.QUESTIONS
                     if q in dict(world.qa_items(k))) for q in qs}) >= 5  # a mix of attributes
    assert world.is_question("What is the capital of Peru?\nWhat is ...")
    assert world.is_question("\n\n  2. What currency is used in Japan?  \n")
    assert not world.is_question("Paris\nWhat is the capital of Spain?")
    assert not world.is_question(" The capital is Paris.")
    assert not world.is_question("")


def test_shakespeare_documents():
    docs = world.shakespeare_documents()
    assert len(docs) == 42
    assert all(d.strip() and "\x0c" not in d for d in docs)
    assert sum(map(len, docs)) > 4_500_000
    assert any("To be, or not to be" in d for d in docs)
    assert any(d.startswith("THE SONNETS") for d in docs)


def test_capital_letter_passages_are_added_beside_the_same_corpus():
    plain = world.world_documents_typed(seed=0, copies=2)
    caps = world.world_documents_typed(seed=0, copies=2, caps_per_copy=5)
    added = [text for kind, text in caps if kind == "caps"]
    assert len(added) == 10 and all(text == text.upper() for text in added)
    assert sorted(t for k, t in caps if k != "caps") == sorted(t for _, t in plain)
    names = {row["name"].upper() for rows in world.load_facts().values() for row in rows}
    assert all(any(name in text for name in names) for text in added)
