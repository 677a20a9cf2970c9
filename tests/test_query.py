"""The private query language (data/query.py): every generated query answers with the fact
tables' value, the splits keep held-out entities and shapes out of training, and a malformed
query gets an error that says where and what was expected."""
import re

import pytest

from data import query, world

FACTS = world.load_facts()
SPLITS = {split: query.query_pairs(split) for split in ("train", "heldout_entities",
                                                        "heldout_shapes")}


@pytest.mark.parametrize("split", list(SPLITS))
def test_every_generated_query_answers_with_the_tables_value(split):
    """The generator computes each answer from the tables itself; the interpreter must agree."""
    for question, text, answer in SPLITS[split]:
        assert query.execute(text, FACTS) == answer, (question, text)
        assert query.parse(query._q(**{k: v for k, v in query.parse(text).items()})) == \
            query.parse(text)  # the writer and the parser agree


def test_the_splits_keep_entities_and_shapes_apart():
    sizes = {split: len(items) for split, items in SPLITS.items()}
    assert sizes["train"] > 2000 and sizes["heldout_entities"] > 500
    assert sizes["heldout_shapes"] > 40
    def named(items):
        return {re.search(r'name = "([^"]+)"', t).group(1) for _, t, _ in items if 'name = "' in t}
    assert named(SPLITS["train"]) and not named(SPLITS["train"]) & named(SPLITS["heldout_entities"])
    assert all(not world.is_heldout(name) for name in named(SPLITS["train"]))
    def shape(text):  # (table, ordered smallest first, several conditions)
        q = query.parse(text)
        return q["table"], bool(q["order"]) and not q["order"][1], len(q["filters"]) > 1
    trained = {shape(t) for _, t, _ in SPLITS["train"]}
    held_out = {shape(t) for _, t, _ in SPLITS["heldout_shapes"]}
    assert not trained & held_out
    # each held-out construct is taught, on another table
    assert {("us_states", True, False), ("us_states", False, True)} <= trained
    assert held_out == {("countries", True, False), ("elements", False, True),
                        ("countries", False, True)}
    assert query.query_pairs("train") == SPLITS["train"]  # deterministic


def test_the_spec_examples_run():
    examples = [line.split("Query:")[1].strip() for line in query.SPEC.splitlines()
                if line.strip().startswith("Query:")]
    assert len(examples) == 4
    assert query.execute(examples[0], FACTS) == ["Paris"]
    assert query.execute(examples[1], FACTS) == ["Neon"]
    assert len(query.execute(examples[2], FACTS)) == 3
    assert query.execute(examples[3], FACTS) == sum(r["statehood_year"] < 1800
                                                    for r in FACTS["us_states"])


def test_results_have_the_documented_forms():
    assert query.execute('elements | symbol = "Fe" | pick name, atomic_number', FACTS) == \
        [("Iron", 26)]
    assert query.execute('elements | group = 18 | bottom 2 by atomic_number | pick symbol',
                         FACTS) == ["He", "Ne"]
    assert query.execute('countries | name = "Atlantis" | pick capital', FACTS) == []


@pytest.mark.parametrize("text,says", [
    ('planets | name = "Mars" | pick moons', "column 1: no table 'planets' (tables: countries"),
    ('countries | name = "France" | pick capitol',
     "column 36: expected a field of countries (name, capital"),
    ('countries | name = "France"', 'the end: expected "|" and a stage, got nothing'),
    ('countries | name = "France" | pick capital | count',
     "column 44: expected the end of the query after pick or count, got '|'"),
    ('countries | population > "big" | count', "column 13: population takes a number"),
    ('countries | name > "F" | count', 'column 13: name takes "text" with = or !='),
    ('countries | top 3 population | pick name', "expected 'by', got 'population'"),
    ('countries | top 3 by name | pick name', "column 22: name is text"),
    ('countries | name == "France" | pick capital', "expected a value (\"text\" or a number)"),
    ('countries | name = "France | pick capital', "column 20: unexpected '\"France | pi'"),
    ('countries | name = France | pick capital', "expected a value"),
    ('', "the end: expected a table"),
    ('countries | "count"', "column 13: expected a field of countries"),  # keywords are words
    ('countries | pick name "," capital', "column 23: expected the end of the query"),
    ('countries | top 0 by population | count', "column 13: top/bottom needs at least 1 row"),
    ('countries | top 3 by population | continent = "Europe" | count',
     "column 35: after top/bottom only pick or count may follow"),
    ('countries | | count', "column 13: expected a field of countries"),
])
def test_a_malformed_query_says_where_and_what(text, says):
    with pytest.raises(query.QueryError) as e:
        query.parse(text)
    assert says in str(e.value), str(e.value)
