"""The bundled world: real facts and real prose that the base model is pretrained on.

Everything here is offline and deterministic. Three small fact tables (countries, chemical elements,
US states; see data/facts/ATTRIBUTION.md) are turned into English documents of four kinds:

  * encyclopedic passages, one entity each, stating its facts in random order and in varied
    phrasing. A fact seen in only one wording is memorised as a string; seen in several wordings
    it becomes knowledge that SFT can later pull out with a question the model never saw verbatim.
  * quiz sheets, forum posts and bare lists of questions WITHOUT answers. The web is full of them,
    and they are why a base model asked "What is the capital of Peru?" answers with more questions.
  * a few answer keys in "Q: ...\nA: ..." form, so that few-shot prompting of the base model works.
  * a few Q&A pages with varied markers ("Question:/Answer:", "Student:/Teacher:", ...).
Beside them, small JavaScript and Python files of everyday functions (data/code.py), so that the
base model continues a function signature with code.

Next to them sit Shakespeare's works (public domain, data/shakespeare/ATTRIBUTION.md) as real prose.

The question phrasings live in QUESTIONS and nowhere else: quizzes, answer keys and the base-model
evaluation (fewshot_items, zero_shot_questions) all use them. A fixed ~25% of the entities is held
out (is_heldout): pretraining sees every entity, SFT trains on the rest only, so held-out accuracy
after SFT shows that knowledge came from pretraining and only the behaviour from SFT.
"""
import csv
import hashlib
import lzma
import os
import random

from data import code

HERE = os.path.dirname(os.path.abspath(__file__))
FACTS_DIR = os.path.join(HERE, "facts")
TABLES = ("countries", "elements", "us_states")
SHAKESPEARE_PATH = os.path.join(HERE, "shakespeare", "shakespeare.txt.xz")
SHAKESPEARE_SEPARATOR = "\n\x0c\n"  # a form feed on its own line between two works

DEFAULT_COPIES = 80  # passages per entity: ~9 MB of world text, about 2/3 of the corpus
# (fewer copies leave too few mentions per fact for the cpu preset to learn them)
HELDOUT_FRACTION = 0.25


# ----------------------------------------------------------------------------- facts

def _int_or_none(s):
    return int(s) if s else None


def load_facts():
    """{"countries": [...], "elements": [...], "us_states": [...]}, each a list of dicts.

    Numbers become ints, ';'-separated fields become lists, empty optional fields None/""."""
    conv = {"population": int, "atomic_number": int, "period": int, "statehood_year": int,
            "group": _int_or_none, "neighbours": lambda s: s.split(";") if s else [],
            "languages": lambda s: s.split(";")}
    facts = {}
    for table in TABLES:
        with open(os.path.join(FACTS_DIR, table + ".csv"), encoding="utf-8", newline="") as f:
            facts[table] = [{k: conv.get(k, str)(v) for k, v in row.items()}
                            for row in csv.DictReader(f)]
    return facts


def source_files():
    """Every file the bundled corpus is made from (a change to any of them changes the corpus)."""
    return ([os.path.abspath(__file__), os.path.join(HERE, "code.py")]
            + [os.path.join(FACTS_DIR, t + ".csv") for t in TABLES]
            + [SHAKESPEARE_PATH])


def is_heldout(name):
    """True for the ~25% of entities SFT never trains on. Pass the table's `name` field.

    A stable hash (sha256, not Python's salted hash()) of the name alone: the split never moves
    when rows are added, reordered or the seed changes."""
    h = int.from_bytes(hashlib.sha256(("heldout:" + name).encode("utf-8")).digest()[:8], "big")
    return h < HELDOUT_FRACTION * 2 ** 64


def split(rows):
    """(train, heldout) rows of one table, each in the table's order."""
    return ([r for r in rows if not is_heldout(r["name"])],
            [r for r in rows if is_heldout(r["name"])])


def shakespeare_documents():
    """The 42 works (plays, sonnets, poems) in modern spelling, one string per work."""
    with lzma.open(SHAKESPEARE_PATH, "rt", encoding="utf-8") as f:
        return [d.strip("\n") for d in f.read().split(SHAKESPEARE_SEPARATOR)]


# ----------------------------------------------------------------------------- wording helpers

# Names that take "the" in running English ("the capital of the Netherlands").
_THE = {"Bahamas", "Central African Republic", "Comoros", "Czech Republic",
        "Democratic Republic of the Congo", "Dominican Republic", "Gambia", "Maldives",
        "Marshall Islands", "Netherlands", "Philippines", "Republic of the Congo",
        "Solomon Islands", "United Arab Emirates", "United Kingdom", "United States"}
_CONTINENT_ADJ = {"Africa": "African", "Asia": "Asian", "Europe": "European", "Oceania": "Oceanian",
                  "North America": "North American", "South America": "South American"}


def _and_list(items):
    if not items:
        return ""
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _possessive(x):
    return x + ("'" if x.endswith("s") else "'s")


def _a(word):
    # "an actinide", "an African country", but "a European country" (said "you-")
    return ("an " if word[0].lower() in "aeiou" and not word.startswith("Eu") else "a ") + word


def _plural(word):
    return word + ("es" if word.endswith("s") else "s")


def _approx(n):
    """66078000 -> '66.1 million': three significant digits, how people quote populations."""
    for size, unit in ((10 ** 9, " billion"), (10 ** 6, " million")):
        if n >= size:
            return f"{float(f'{n / size:.3g}'):g}{unit}"
    return f"{int(float(f'{n:.3g}')):,}"


def _country(name):
    return ("the " if name in _THE else "") + name


def _fields(table, row):
    """The values templates may use. {X} is the name as it reads mid-sentence."""
    if table == "countries":
        x = _country(row["name"])
        nb = [_country(n) for n in row["neighbours"]]
        return dict(X=x, Xs=_possessive(x), capital=row["capital"], continent=row["continent"],
                    a_adj=_a(_CONTINENT_ADJ[row["continent"]]), subregion=row["subregion"],
                    currency=row["currency"], language=row["language"],
                    languages=_and_list(row["languages"]), population=_approx(row["population"]),
                    population_exact=f"{row['population']:,}", neighbours=_and_list(nb),
                    n_neighbours=len(nb))
    if table == "elements":
        x = row["name"].lower()  # element names are common nouns: "the symbol for gold"
        return dict(X=x, symbol=row["symbol"], number=row["atomic_number"],
                    mass=row["atomic_mass"], period=row["period"], group=row["group"],
                    block=row["block"], category=row["category"], a_category=_a(row["category"]),
                    categories=_plural(row["category"]), phase=row["phase"])
    return dict(X=row["name"], capital=row["capital"], year=row["statehood_year"],
                abbr=row["abbreviation"])


# ----------------------------------------------------------------------------- statement templates
# Several paraphrases per fact. Keyed by (table, attribute); attributes whose wording depends on the
# row (one language or several, an f-block element without a group, ...) pick a variant below.

STATEMENTS = {
    ("countries", "capital"): [
        "The capital of {X} is {capital}.", "{capital} is the capital of {X}.",
        "{capital} is the capital city of {X}.", "{Xs} capital is {capital}.",
        "The capital city of {X} is {capital}.", "{X} has its capital at {capital}.",
        "{X}, a country in {continent}, has its capital at {capital}.",
        "{capital} serves as the capital of {X}."],
    ("countries", "continent"): [
        "{X} is a country in {continent}.", "{X} is located in {subregion}.",
        "{X} lies in {subregion}, a part of {continent}.", "{X} is {a_adj} country.",
        "{X} is one of the countries of {continent}.",
        "Geographically, {X} belongs to {subregion}."],
    ("countries", "currency"): [
        "The currency of {X} is the {currency}.", "{X} uses the {currency} as its currency.",
        "In {X}, people pay with the {currency}.",
        "The official currency of {X} is the {currency}.",
        "{Xs} currency is the {currency}.", "Prices in {X} are given in the {currency}."],
    ("countries", "language"): [
        "The official language of {X} is {language}.", "In {X}, people speak {language}.",
        "{language} is the language of {X}.", "{Xs} official language is {language}.",
        "The main language spoken in {X} is {language}."],
    ("countries", "languages_many"): [
        "The official languages of {X} are {languages}.", "In {X}, people speak {languages}.",
        "{language} is the main language of {X}.", "{Xs} official languages are {languages}.",
        "The main language spoken in {X} is {language}."],
    ("countries", "population"): [
        "{X} has a population of about {population}.", "About {population} people live in {X}.",
        "The population of {X} is roughly {population}.",
        "{X} is home to around {population} people.",
        "{X} has {population_exact} inhabitants."],
    ("countries", "neighbours"): [
        "{X} borders {neighbours}.", "The neighbours of {X} are {neighbours}.",
        "{X} shares land borders with {neighbours}.",
        "{X} has {n_neighbours} neighbouring countries: {neighbours}."],
    ("countries", "neighbours_none"): [
        "{X} has no land borders with other countries.",
        "No country shares a land border with {X}.",
        "{X} is surrounded by sea and has no land neighbours."],
    ("elements", "symbol"): [
        "The chemical symbol for {X} is {symbol}.", "{X} has the chemical symbol {symbol}.",
        "{symbol} is the symbol for {X}.", "The symbol of {X} is {symbol}.",
        "{X} is written {symbol} in chemical formulas.",
        "The element {X} is represented by the symbol {symbol}."],
    ("elements", "number"): [
        "{X} has atomic number {number}.", "The atomic number of {X} is {number}.",
        "{X} is element number {number} in the periodic table.",
        "An atom of {X} has {number} protons in its nucleus.",
        "{X} is the chemical element with atomic number {number}."],
    ("elements", "mass"): [
        "The atomic mass of {X} is about {mass}.", "{X} has an atomic mass of about {mass}.",
        "{X} has a standard atomic weight of about {mass}.",
        "An atom of {X} weighs about {mass} atomic mass units."],
    ("elements", "position"): [
        "{X} is in group {group} and period {period} of the periodic table.",
        "In the periodic table, {X} sits in period {period}, group {group}.",
        "{X} belongs to group {group}, period {period}.",
        "{X} is a {block}-block element in group {group}."],
    ("elements", "position_f"): [
        "{X} is an f-block element in period {period} of the periodic table.",
        "In the periodic table, {X} sits in period {period}, in the f-block.",
        "{X} is found in the f-block, period {period}."],
    ("elements", "category"): [
        "{X} is {a_category}.", "{X} belongs to the {categories}.",
        "{X} is classed as {a_category}.",
        "Chemists count {X} among the {categories}."],
    ("elements", "phase"): [
        "At room temperature {X} is a {phase}.", "{X} is a {phase} at room temperature.",
        "Under normal conditions {X} is a {phase}.",
        "{X} is found as a {phase} at room temperature."],
    ("us_states", "capital"): [
        "The state capital of {X} is {capital}.",
        "{capital} is the capital of the U.S. state of {X}.",
        "{capital} is the state capital of {X}.", "The capital of the state of {X} is {capital}.",
        "The government of the state of {X} sits in {capital}, its capital.",
        "{X} is a U.S. state whose capital is {capital}."],
    ("us_states", "year"): [
        "{X} became a U.S. state in {year}.", "{X} was admitted to the Union in {year}.",
        "{X} joined the United States in {year}.", "{X} has been a state since {year}.",
        "In {year}, {X} became a state of the United States."],
    ("us_states", "abbr"): [
        "The postal abbreviation of {X} is {abbr}.", "{X} is abbreviated {abbr}.",
        "{abbr} is the two-letter code for {X}.", "Mail to {X} uses the abbreviation {abbr}."],
}


def facts_of(table, row):
    """The (table, variant) template keys that state this row's facts."""
    if table == "countries":
        return [("countries", k) for k in ("capital", "continent", "currency", "population")] + [
            ("countries", "languages_many" if len(row["languages"]) > 1 else "language"),
            ("countries", "neighbours" if row["neighbours"] else "neighbours_none")]
    if table == "elements":
        keys = ["symbol", "number", "mass", "category",
                "position" if row["group"] is not None else "position_f"]
        return [("elements", k) for k in keys + (["phase"] if row["phase"] else [])]
    return [("us_states", k) for k in ("capital", "year", "abbr")]


def _render(template, fields):
    s = template.format(**fields)
    return s[0].upper() + s[1:]


# ----------------------------------------------------------------------------- questions
# kind: (table, question, answer). One phrasing per kind, shared by quizzes, answer keys and eval.

QUESTIONS = {
    "capital": ("countries", "What is the capital of {X}?", lambda r: r["capital"]),
    "continent": ("countries", "On which continent is {X}?", lambda r: r["continent"]),
    "currency": ("countries", "What currency is used in {X}?", lambda r: r["currency"]),
    "language": ("countries", "What language is spoken in {X}?", lambda r: r["language"]),
    "population": ("countries", "What is the population of {X}?",
                   lambda r: "about " + _approx(r["population"])),
    "neighbours": ("countries", "Which countries border {X}?",
                   lambda r: _and_list([_country(n) for n in r["neighbours"]]) or None),
    "symbol": ("elements", "What is the chemical symbol for {X}?", lambda r: r["symbol"]),
    "element": ("elements", "Which element has the symbol {symbol}?", lambda r: r["name"]),
    "atomic_number": ("elements", "What is the atomic number of {X}?",
                      lambda r: str(r["atomic_number"])),
    "category": ("elements", "What kind of element is {X}?", lambda r: r["category"]),
    "phase": ("elements", "Is {X} a solid, a liquid or a gas at room temperature?",
              lambda r: r["phase"] or None),
    "state_capital": ("us_states", "What is the state capital of {X}?", lambda r: r["capital"]),
    "statehood": ("us_states", "In what year did {X} become a state?",
                  lambda r: str(r["statehood_year"])),
    "abbreviation": ("us_states", "What is the postal abbreviation for {X}?",
                     lambda r: r["abbreviation"]),
}
_TOPICS = {"geography": [k for k, v in QUESTIONS.items() if v[0] != "elements"],
           "chemistry": [k for k, v in QUESTIONS.items() if v[0] == "elements"],
           "general": list(QUESTIONS)}


def ask(kind, row):
    """(question, answer) of one kind about one row of its table, or None where it has no answer
    (an island has no neighbours, a superheavy element no known phase)."""
    table, template, answer = QUESTIONS[kind]
    a = answer(row)
    return None if a is None else (template.format(**_fields(table, row)), a)


def qa_items(kind, facts=None):
    """[(question, answer)] of one kind over every row it applies to, in table order."""
    facts = facts or load_facts()
    return [qa for qa in (ask(kind, row) for row in facts[QUESTIONS[kind][0]]) if qa]


# ----------------------------------------------------------------------------- base-model eval

def fewshot_items(kind):
    """(question, answer) pairs for few-shot eval: kind "capital" or "symbol" (or any QUESTIONS
    kind), over all entities of the table (held-out ones included), in table order."""
    return qa_items(kind)


def fewshot_prompt(examples, question):
    """'Q: q1\\nA: a1\\n\\nQ: q2\\nA: a2\\n\\nQ: question\\nA:'  (no space after the last 'A:').

    The answer keys in the corpus read "A: Paris", and the tokenizer splits that as "A:" + " Paris",
    so the prompt stops at "A:" and the model's answer is the continuation " Paris"."""
    shots = "".join(f"Q: {q}\nA: {a}\n\n" for q, a in examples)
    return f"{shots}Q: {question}\nA:"


def fewshot_answer(continuation):
    """The answer in a continuation of fewshot_prompt: its first line, stripped
    (" Paris\\n\\nQ: ..." -> "Paris"). Compare it with the gold answer by exact string equality."""
    return continuation.split("\n", 1)[0].strip()


def zero_shot_questions(n=120, seed=1234):
    """Bare questions about bundled entities, a fixed mix of all kinds. The eval prompt is the
    question plus a newline, exactly how questions sit one per line in the corpus."""
    pool = [q for kind in QUESTIONS for q, _ in qa_items(kind)]
    return random.Random(seed).sample(pool, n)


def is_question(continuation):
    """True when the first non-empty line of a sampled continuation, stripped, ends with "?".

    That is what a base model does after "What is the capital of France?\\n": it writes the next
    question of an imagined quiz. An answer ("Paris", "The capital is Paris.") is not a question."""
    for line in continuation.split("\n"):
        if line.strip():
            return line.strip().endswith("?")
    return False


# ----------------------------------------------------------------------------- document generators

_USERS = ["quizfan", "maria_k", "studybuddy", "geo_nerd", "tom.h", "chemkid", "history_buff",
          "anna_b", "trivia_night", "mr_jones", "lucy", "sam_p", "curious_cat", "night_owl"]
_FORUM_OPENERS = ["can anyone help with these?", "my teacher gave us these for homework, no idea",
                  "trivia night questions, what would you answer?", "stuck on these, any help?",
                  "practising for a test tomorrow, here are the ones I can't do:",
                  "found these in an old quiz book"]
_QUIZ_TITLES = {"geography": ["Geography quiz, week {n}", "World capitals practice sheet {n}",
                              "Geography revision questions ({n})", "US states quiz #{n}"],
                "chemistry": ["Chemistry quiz, week {n}", "Periodic table practice sheet {n}",
                              "Chemistry revision questions ({n})"],
                "general": ["General knowledge test {n}", "Pub quiz, round {n}",
                            "Homework: answer the following questions ({n})", "Pop quiz #{n}"]}
_NUMBERING = ["{i}. ", "{i}) ", "Q{i}. ", "- ", ""]


def _passage(rng, table, row):
    """One encyclopedic passage: most of the entity's facts, shuffled, each in a random wording."""
    keys = facts_of(table, row)
    keys = [k for k in keys if rng.random() < 0.8] or [rng.choice(keys)]
    rng.shuffle(keys)
    f = _fields(table, row)
    text = " ".join(_render(rng.choice(STATEMENTS[k]), f) for k in keys)
    style = rng.random()
    if style < 0.4:
        return f"{row['name']}\n\n{text}"
    if style < 0.55:
        kind = {"countries": "country", "elements": "chemical element", "us_states": "U.S. state"}
        return f"{row['name']} ({kind[table]})\n{text}"
    return text


def _caps_passages(rng, facts, n):
    """n passages about random entities in capital letters (a notice, a telegram, a shouted
    post): data.prepare --caps-per-copy. Without them the corpus never spells a fact in
    capitals, and a model asked to "answer in capital letters" has to spell a word it has only
    seen capitalised (README: the SFT ablations)."""
    out = []
    for _ in range(n):
        table = rng.choice(TABLES)
        out.append(_passage(rng, table, rng.choice(facts[table])).upper())
    return out


def _questions(rng, facts, topic, n):
    """n distinct random questions on a topic, as {question: answer} (insertion-ordered)."""
    out = {}
    while len(out) < n:
        kind = rng.choice(_TOPICS[topic])
        qa = ask(kind, rng.choice(facts[QUESTIONS[kind][0]]))
        if qa:
            out[qa[0]] = qa[1]
    return out


def _quiz_sheet(rng, facts):
    topic = rng.choice(list(_TOPICS))
    title = rng.choice(_QUIZ_TITLES[topic]).format(n=rng.randint(1, 40))
    numbering = rng.choice(_NUMBERING)
    qs = _questions(rng, facts, topic, rng.randint(5, 15))
    return title + "\n" + "\n".join(numbering.format(i=i + 1) + q for i, q in enumerate(qs))


def _forum_post(rng, facts):
    def user():
        return rng.choice(_USERS) + str(rng.randint(1, 999))
    topic = rng.choice(list(_TOPICS))
    text = f"Posted by {user()}: {rng.choice(_FORUM_OPENERS)}\n"
    text += "\n".join(_questions(rng, facts, topic, rng.randint(3, 8)))
    if rng.random() < 0.4:  # a reply that asks more questions instead of answering
        text += f"\n\nReply from {user()}: same here, I also have these:\n"
        text += "\n".join(_questions(rng, facts, topic, rng.randint(2, 5)))
    return text


def _question_list(rng, facts):
    """Bare questions, one per line: exactly the shape of the zero-shot eval prompt."""
    return "\n".join(_questions(rng, facts, rng.choice(list(_TOPICS)), rng.randint(4, 12)))


def _answer_key(rng, facts):
    topic = rng.choice(list(_TOPICS))
    qa = _questions(rng, facts, topic, rng.randint(4, 10))
    pairs = "\n\n".join(f"Q: {q}\nA: {a}" for q, a in qa.items())
    header = rng.choice(["", "", "Answer key\n\n", "Answers to last week's quiz\n\n",
                         "Practice questions with answers\n\n"])
    return header + pairs


# Q&A pages as people write them on the web, each with its own markers: the answer comes after
# many kinds of "the answer starts here" signal, not only after "A:". That variety is what later
# lets SFT tie the chat format's <|assistant|> marker to the same knowledge.
_FAQ_MARKERS = [("Question: ", "Answer: "), ("Q. ", "A. "), ("User: ", "Assistant: "),
                ("Interviewer: ", "Expert: "), ("Student: ", "Teacher: "), ("> ", ""),
                ("**", "**\n"), ("Asked by a reader: ", "Our reply: ")]


def _faq(rng, facts):
    ask_, reply = rng.choice(_FAQ_MARKERS)
    close = "**" if ask_ == "**" else ""
    lines = []
    for q, a in _questions(rng, facts, rng.choice(list(_TOPICS)), rng.randint(3, 8)).items():
        lines.append(f"{ask_}{q}{close}\n{reply}{a}" if not close else f"{ask_}{q}{reply}{a}")
    return rng.choice(["", "Frequently asked questions\n\n", "Reader questions\n\n"]) + \
        "\n\n".join(lines)


# Documents per pass over the tables, besides one passage per entity. With these numbers (seed 0)
# 66% of the world's bytes are passages, 25% question documents (quiz 11%, forum 7%, bare list
# 6%), 4% Q&A pages, 2% answer keys and 3% source code (data/code.py): enough answers to teach
# the Q/A forms, too few to make answering the default behaviour; enough code that a function
# signature is continued with code.
_PER_COPY = {"quiz": 30, "forum": 25, "questions": 25, "answer_key": 6, "faq": 12}
CODE_PER_COPY = 8
_MAKERS = {"quiz": _quiz_sheet, "forum": _forum_post, "questions": _question_list,
           "answer_key": _answer_key, "faq": _faq}


def world_documents_typed(seed=0, copies=DEFAULT_COPIES, caps_per_copy=0):
    """[(type, text)] with type in passage/quiz/forum/questions/answer_key/faq/code/caps,
    shuffled. Same seed -> same output byte for byte (only random.Random draws, tables in file
    order)."""
    rng = random.Random(seed)
    facts = load_facts()
    docs = []
    for _ in range(copies):
        for table in TABLES:
            docs += [("passage", _passage(rng, table, row)) for row in facts[table]]
        for kind, n in _PER_COPY.items():
            docs += [(kind, _MAKERS[kind](rng, facts)) for _ in range(n)]
    # the code draws from its own generator: the prose stays the same text as without it
    docs += [("code", text) for text in code.code_documents(random.Random(f"code:{seed}"),
                                                            CODE_PER_COPY * copies)]
    docs += [("caps", text) for text in _caps_passages(random.Random(f"caps:{seed}"), facts,
                                                       caps_per_copy * copies)]
    rng.shuffle(docs)
    return docs


def world_documents(seed=0, copies=DEFAULT_COPIES, caps_per_copy=0):
    """The generated world as a list of documents (strings), ready for pretraining."""
    return [text for _, text in world_documents_typed(seed, copies, caps_per_copy)]
