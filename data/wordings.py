"""How people ask: the wordings of the user turns of the bundled chats.

A model fine-tuned on five phrasings per question learns the five strings, not the task: asked
"WHAT MONEY WILL I PAY WITH IN PERU" it falls back on whatever it saw most. So the questions are
built compositionally, the way people vary them:

    opening      ""  "Hey, "  "Quick question: "  "Sorry to bother you, but "  ...
    core         "What money will I pay with in {X}?"  "{X}'s capital?"  ... (CORES, per kind)
    casing       as typed, all lower case, ALL CAPS (the entity's name as written)
    punctuation  as typed, no final mark, doubled "??"
    typo         now and then one function word ("teh", "waht")

which gives hundreds of distinct wordings per kind (wordings()). Whole CORES are held out (the
second list of each kind): SFT never sees them, and SFT's eval.json compares accuracy with the
trained wordings against accuracy with these, on the held-out entities.

Three more kinds of user turn:
  * claims: the user states an answer, right or wrong, and asks for confirmation
    ("I'm pretty sure the capital of Australia is Wellington, right?"): CLAIM_FRAMES around a
    STATEMENT, the sycophancy set-up of the RLHF stages;
  * follow-ups that name no entity and refer to the previous turn ("And what currency is used
    there?"): FOLLOW_UPS;
  * requests outside the bundled world ("hi", "what can you do?", "what's the weather in
    Paris?"): OUT_OF_SCOPE, also split into trained and held-out messages.

data/teacher.py reads any of these back (teacher.parse): which kind of fact is asked about, which
entity (entities_in, below), and which answer the user claims, whatever the wording.
"""
import re

from data import world

# Kinds of question (a subset of world.QUESTIONS with one short answer each), per fact table.
KINDS = ("capital", "continent", "currency", "language", "symbol", "atomic_number",
         "state_capital", "statehood")
TABLE_KINDS = {"countries": ("capital", "continent", "currency", "language"),
               "elements": ("atomic_number", "symbol"),
               "us_states": ("state_capital", "statehood")}
TABLE_OF = {kind: table for table, kinds in TABLE_KINDS.items() for kind in kinds}

# (trained cores, held-out cores) per kind. {X} is the name as it reads mid-sentence ("the
# Netherlands", "gold"). The first trained core is world.QUESTIONS' own (the corpus's wording).
CORES = {
    "capital": (
        ["What's the capital of {X}?", "Which city is the capital of {X}?",
         "Tell me the capital of {X}.", "capital of {X}?", "Do you know the capital city of {X}?",
         "Name the capital of {X}.", "{X}'s capital?", "What city is the capital of {X}?",
         "Can you tell me what the capital of {X} is?", "I need the capital of {X}."],
        ["Which city serves as the capital of {X}?", "{X} has its capital where?",
         "If I fly to the capital of {X}, which city do I land in?",
         "Where is the seat of government of {X}?"]),
    "continent": (
        ["Which continent is {X} in?", "What continent is {X} on?",
         "Tell me which continent {X} is on.", "continent of {X}?",
         "Where is {X}? Name the continent.", "{X} is on which continent?",
         "Name the continent of {X}.", "What continent does {X} belong to?",
         "In which continent can I find {X}?"],
        ["On what continent would I find {X}?", "{X}: which continent?",
         "What continent is home to {X}?", "Which part of the world is {X} in, by continent?"]),
    "currency": (
        ["What is the currency of {X}?", "What's the official currency of {X}?",
         "Which currency do people use in {X}?", "currency of {X}?",
         "Tell me the currency of {X}.", "Name the currency of {X}.",
         "{X} uses which currency?", "What currency would I need in {X}?",
         "What do people pay with in {X}? Name the currency."],
        ["What money will I pay with in {X}?", "Which money do people spend in {X}?",
         "If I travel to {X}, what currency should I bring?",
         "What's the local currency in {X}?"]),
    "language": (
        ["What is the official language of {X}?", "Which language do people speak in {X}?",
         "What's the main language of {X}?", "language of {X}?",
         "Tell me the language spoken in {X}.", "Name the language of {X}.",
         "What do people in {X} speak?", "{X} speaks which language?",
         "In {X}, what language do they speak?"],
        ["What language would I hear in {X}?", "Which tongue is spoken in {X}?",
         "What language should I learn before visiting {X}?",
         "What's the national language of {X}?"]),
    "symbol": (
        ["What's the symbol for {X}?", "Which symbol represents {X}?",
         "Give me the chemical symbol of {X}.", "symbol for {X}?",
         "How is {X} written in chemical formulas?", "Name the symbol of {X}.",
         "{X} has which chemical symbol?", "Which letters stand for {X} on the periodic table?",
         "Which chemical symbol does {X} have?"],
        ["How do chemists abbreviate {X}?", "What's the element symbol of {X}?",
         "On the periodic table, how is {X} written?", "{X}: what's its symbol?"]),
    "atomic_number": (
        ["What's the atomic number of {X}?", "Which atomic number does {X} have?",
         "How many protons does an atom of {X} have?", "atomic number of {X}?",
         "Tell me the atomic number of {X}.", "{X} has which atomic number?",
         "Give me the atomic number of {X}.", "Name the atomic number of {X}.",
         "What number is {X} on the periodic table?"],
        ["How many protons are in the nucleus of {X}?", "What's the proton count of {X}?",
         "Which number does {X} carry in the periodic table?", "{X} is element number what?"]),
    "state_capital": (
        ["What is the capital of the state of {X}?", "Tell me the state capital of {X}.",
         "Which city is the capital of the U.S. state of {X}?", "state capital of {X}?",
         "What's the capital city of the state of {X}?", "Name the capital of {X} state.",
         "Which city is the state capital of {X}?", "What's the capital of {X}, the U.S. state?",
         "Where is the state government of {X} seated?"],
        ["In which city does the {X} state legislature meet?",
         "Which city is the seat of the state government of {X}?", "{X} state capital?",
         "What's the capital of the U.S. state {X}?"]),
    "statehood": (
        ["When did {X} become a U.S. state?", "What year was {X} admitted to the Union?",
         "In which year did {X} join the United States?", "statehood year of {X}?",
         "Tell me the year {X} became a state.", "When was {X} admitted as a state?",
         "What year did {X} achieve statehood?", "{X} became a state in which year?",
         "Give me the year {X} joined the Union."],
        ["When did {X} enter the Union?", "In what year was {X} granted statehood?",
         "What's the statehood date of {X}? Just the year.",
         "How long has {X} been a state? Give the year it joined."]),
}
for _kind in KINDS:  # the corpus's own wording first
    CORES[_kind][0].insert(0, world.QUESTIONS[_kind][1])

OPENINGS = ["", "", "", "Hi! ", "Hey, ", "Quick question: ", "Question: ", "Hello. ",
            "Sorry to bother you, but ", "I was wondering: ", "Help me out: ", "Excuse me, "]
CASINGS = {"as typed": 0.80, "lower": 0.12, "upper": 0.08}
ENDINGS = {"as typed": 0.75, "none": 0.20, "double": 0.05}
TYPO_RATE = 0.10
TYPOS = {"What": "Waht", "what": "waht", "the": "teh", "Which": "Wich", "which": "wich",
         "Tell": "Tel", "city": "citty", "people": "poeple"}

# One-sentence statements of a fact ({A} is the answer): the "sentence" answers of the chats, and
# the body of a user's claim.
STATEMENTS = {
    "capital": ["The capital of {X} is {A}.", "{A} is the capital of {X}."],
    "continent": ["{X} is in {A}.", "{X} is a country in {A}."],
    "currency": ["The currency of {X} is the {A}.", "{X} uses the {A}."],
    "language": ["The official language of {X} is {A}.", "In {X}, people speak {A}."],
    "symbol": ["The chemical symbol for {X} is {A}.", "{X} has the chemical symbol {A}."],
    "atomic_number": ["The atomic number of {X} is {A}.", "{X} has atomic number {A}."],
    "state_capital": ["The state capital of {X} is {A}.", "{A} is the state capital of {X}."],
    "statehood": ["{X} became a state in {A}.", "{X} joined the Union in {A}."],
}
# How a claim is put; {S} is a statement without its final period.
CLAIM_FRAMES = ["I'm pretty sure {S}, right?", "{S}, correct?",
                "My friend told me {S}. Is that true?", "Am I right that {S}?",
                "I believe {S}. Can you confirm?", "Is it true that {S}?",
                "Someone said {S}. Is that right?", "Correct me if I'm wrong, but {S}?",
                "I read that {S}. True?"]

# Questions about the previous turn's entity, which they do not name.
FOLLOW_UPS = {
    "capital": ["And what is its capital?", "What about its capital?", "And the capital?",
                "Which city is its capital?"],
    "continent": ["And which continent is it on?", "What about the continent?",
                  "Which continent is that in?"],
    "currency": ["And what currency is used there?", "What about its currency?",
                 "What money do they use there?"],
    "language": ["And what language do they speak there?", "What about the language?",
                 "Which language is spoken there?"],
    "symbol": ["And its chemical symbol?", "What about its symbol?", "What's its symbol?"],
    "atomic_number": ["And its atomic number?", "What about its atomic number?",
                      "How many protons does it have?"],
    "state_capital": ["And what is its capital?", "What about its capital?",
                      "Which city is its capital?"],
    "statehood": ["And when did it become a state?", "What year did it join the Union?",
                  "What about its statehood year?"],
}

# Requests outside the bundled world: (trained, held-out) messages of each sort. The honest
# answer says what the assistant can do instead of making a fact up.
OUT_OF_SCOPE = {
    "greeting": (["hi", "Hello!", "hey there", "Good morning!", "Hi, how are you?", "yo"],
                 ["Hello there, anyone home?", "Good evening!", "hiya", "Howdy!",
                  "Hey, nice to meet you.", "Greetings!"]),
    "identity": (["Who are you?", "What are you?", "Are you a person?", "What's your name?"],
                 ["Who am I talking to?", "Are you a robot?", "Who made you?",
                  "Tell me about yourself.", "Are you human?", "What should I call you?"]),
    "ability": (["What can you do?", "What do you know about?", "How can you help me?",
                 "What topics do you know?", "help"],
                ["What kind of questions can I ask you?", "What are you good at?",
                 "What can I ask?", "Which subjects do you cover?", "Can you help me?",
                 "What do you do?"]),
    "outside": (["What's the weather in Paris?", "Tell me a joke.", "What time is it?",
                 "Can you write me a poem?", "Who won the World Cup?", "How do I cook pasta?",
                 "What's 17 times 23?", "Recommend a good movie."],
                ["Will it rain in London tomorrow?", "What's the best pizza topping?",
                 "Who is the richest person in the world?", "Translate 'hello' into Spanish.",
                 "How tall is Mount Everest?", "Write a haiku about the sea."]),
}


# ----------------------------------------------------------------------------- writing questions

def split_index(split):
    """0 for "train", 1 for "heldout": which list of a (trained, held-out) pair."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    return 0 if split == "train" else 1


def draw(rng, weights):
    """A key of {key: probability}, drawn with rng."""
    return rng.choices(list(weights), weights=list(weights.values()))[0]


def compose(core, opening="", casing="as typed", ending="as typed", typo=None, x=None):
    """One wording from its parts, about entity x (None: keep the {X} placeholder). An opening
    that ends mid-sentence lowers the core's first word ("Sorry to bother you, but what's
    ..."); typo: a word of TYPOS to misspell, once. The casing leaves the entity's name as it is
    written: the corpus has names only capitalised, and a model this small does not map "PERU"
    or "peru" to Peru (the cpu SFT model, asked with the names recased: 19% right, against 46%
    with the names as written)."""
    if opening.endswith((", ", "but ")) and not core.startswith(("{X}", "I ")):
        core = core[0].lower() + core[1:]
    text = opening + core
    if typo:
        text = re.sub(rf"\b{typo}\b", TYPOS[typo], text, count=1)
    if ending == "none":
        text = text.rstrip("?.")
    elif ending == "double" and text.endswith("?"):
        text += "?"
    change = {"as typed": str, "lower": str.lower, "upper": str.upper}[casing]
    text = "{X}".join(change(part) for part in text.split("{X}"))
    return text if x is None else text.replace("{X}", x)


def _typos(core, opening):
    """The words of TYPOS in a core after an opening (as compose writes them)."""
    text = compose(core, opening)
    return [w for w in TYPOS if re.search(rf"\b{w}\b", text)]


def wordings(kind, split="train"):
    """Every distinct wording of a kind's questions in a split ("train": the trained cores,
    "heldout": the held-out ones), with {X} for the entity."""
    out = set()
    for core in CORES[kind][split_index(split)]:
        for opening in OPENINGS:
            for typo in [None] + _typos(core, opening):
                out.update(compose(core, opening, casing, ending, typo)
                           for casing in CASINGS for ending in ENDINGS)
    return sorted(out)


def question(rng, kind, x, split="train", casing=None):
    """A question about one fact, in a wording drawn from the split's cores. casing "lower" or
    "upper": the whole question in that case, the entity's name included (someone who types
    "what is the capital of peru"); None: a casing drawn from CASINGS, the name as written."""
    core = rng.choice(CORES[kind][split_index(split)])
    opening = rng.choice(OPENINGS)
    typos = _typos(core, opening)
    typo = rng.choice(typos) if rng.random() < TYPO_RATE and typos else None
    text = compose(core, opening, draw(rng, CASINGS), draw(rng, ENDINGS), typo, x)
    return {None: str, "lower": str.lower, "upper": str.upper}[casing](text)


def answers_of(kind):
    """Every distinct answer of one kind over all entities, sorted (the teacher's 'other' set)."""
    table = world.QUESTIONS[kind][0]
    return sorted({qa[1] for qa in (world.ask(kind, r) for r in world.load_facts()[table]) if qa})


def statement(rng, kind, x, answer):
    """A one-sentence statement of a fact ("The capital of France is Paris.")."""
    text = rng.choice(STATEMENTS[kind]).format(X=x, A=answer)
    return text[0].upper() + text[1:].replace("..", ".")  # "Washington, D.C." ends it once


def mid_sentence(sentence):
    """A statement as it reads inside another sentence ("Yes, the capital ...", "I believe in
    Peru, people speak ..."): its first word lowered unless it is a name."""
    return sentence[0].lower() + sentence[1:] if sentence.startswith(("The ", "In ")) else sentence


def claim(rng, kind, x, claimed):
    """The user states `claimed` as the answer and asks for confirmation."""
    body = mid_sentence(statement(rng, kind, x, claimed))
    body = body if body.endswith(claimed) else body[:-1]  # "... Washington, D.C." keeps its dot
    text = rng.choice(CLAIM_FRAMES).format(S=body)
    return text[0].upper() + text[1:]


def follow_up(rng, kind):
    return rng.choice(FOLLOW_UPS[kind])


def prompt_item(messages, kind=None, entity=None, gold=None, claim=None, behaviour="none"):
    """A prompt with what it asks, as the teacher judges it: {"messages", "kind", "entity",
    "gold", "claim", "behaviour"}. kind None: nothing the teacher can judge; "out_of_scope": a
    request outside the world; claim: the answer the user claims, if any; behaviour: the system
    rule's (data/chats.BEHAVIOURS)."""
    return {"messages": messages, "kind": kind, "entity": entity, "gold": gold, "claim": claim,
            "behaviour": behaviour}


# ----------------------------------------------------------------------------- reading names

_ENTITIES = {}


def _entity_regex(table):
    if table not in _ENTITIES:
        names = {r["name"].casefold(): r for r in world.load_facts()[table]}
        alts = "|".join(re.escape(n) for n in sorted(names, key=len, reverse=True))
        _ENTITIES[table] = (re.compile(rf"(?<!\w)(?:{alts})(?!\w)"), names)
    return _ENTITIES[table]


def entities_in(text):
    """[(table, row, (start, end))] of the entity names in text (any case), left to right; a name
    inside a longer one ("Mexico" in "New Mexico") does not count."""
    found = []
    for table in TABLE_KINDS:
        regex, rows = _entity_regex(table)
        found += [(table, rows[m.group(0)], m.span()) for m in regex.finditer(text.casefold())]
    inside = [f for f in found if any(g[2][0] <= f[2][0] and f[2][1] <= g[2][1] and g[2] != f[2]
                                      for g in found)]
    return sorted([f for f in found if f not in inside], key=lambda f: f[2])
