"""The bundled SFT data: chats about the world's entities, and the held-out evaluation prompts.

SFT teaches behaviour, not knowledge. Pretraining (data/world.py) showed the base model every
entity's facts in many wordings; these chats show it what to DO with a question: answer it once,
in the format the system prompt asks for, and stop. They only ever talk about the training
entities (`not world.is_heldout(name)`); the evaluation prompts ask about the held-out ones, which
the model met in pretraining but never in a chat. If the SFT model answers those correctly, the
fact came from pretraining and only the behaviour from SFT.

What the chats contain, and why:
  * several phrasings per question kind (PHRASINGS; the first is world.QUESTIONS' own), so the
    model learns to answer a question, not a string;
  * system prompts with measurable effects (SYSTEM_RULES): "one_word", "sentence", "uppercase",
    each in several wordings, sometimes after a persona ("You are a helpful SRE assistant.");
    40% of the chats have no system message (behaviour "none");
  * demonstrations of MIXED quality, as written by a pool of human annotators (STYLE_MIX): terse,
    full sentences, verbose with filler, opening with flattery, a few wrong. SFT imitates all of
    it; that is what RLHF later has to improve (and, with a biased labeler, to exaggerate).
    Under a system rule the annotators mostly comply (SYSTEM_COMPLY = 90%);
  * some multi-turn chats (MULTI_TURN: two question/answer turns).

Everything is deterministic: random.Random(seed) draws only, tables in file order.
data/teacher.py judges the answers against the same fact tables.
"""
import hashlib
import random

from data import world

# The question kinds chats ask about (a subset of world.QUESTIONS with one short answer each).
KINDS = ("capital", "continent", "currency", "language", "symbol", "atomic_number",
         "state_capital", "statehood")

# Several ways to ask each kind. {X} is the name as it reads mid-sentence ("the Netherlands",
# "gold"), exactly as in the pretraining corpus. The first phrasing is world.QUESTIONS'.
PHRASINGS = {
    "capital": ["What's the capital of {X}?", "Which city is the capital of {X}?",
                "Tell me the capital of {X}.", "capital of {X}?",
                "Do you know the capital city of {X}?"],
    "continent": ["Which continent is {X} in?", "What continent is {X} on?",
                  "Tell me which continent {X} is on.", "continent of {X}?",
                  "Where is {X}? Name the continent."],
    "currency": ["What is the currency of {X}?", "What's the official currency of {X}?",
                 "Which currency do people use in {X}?", "currency of {X}?",
                 "Tell me the currency of {X}."],
    "language": ["What is the official language of {X}?", "Which language do people speak in {X}?",
                 "What's the main language of {X}?", "language of {X}?",
                 "Tell me the language spoken in {X}."],
    "symbol": ["What's the symbol for {X}?", "Which symbol represents {X}?",
               "Give me the chemical symbol of {X}.", "symbol for {X}?",
               "How is {X} written in chemical formulas?"],
    "atomic_number": ["What's the atomic number of {X}?", "Which atomic number does {X} have?",
                      "How many protons does an atom of {X} have?", "atomic number of {X}?",
                      "Tell me the atomic number of {X}."],
    "state_capital": ["What is the capital of the state of {X}?",
                      "Tell me the state capital of {X}.",
                      "Which city is the capital of the U.S. state of {X}?",
                      "state capital of {X}?", "What's the capital city of the state of {X}?"],
    "statehood": ["When did {X} become a U.S. state?", "What year was {X} admitted to the Union?",
                  "In which year did {X} join the United States?", "statehood year of {X}?",
                  "Tell me the year {X} became a state."],
}
for _k in KINDS:  # world.QUESTIONS' phrasing first: the one the corpus and the base-model eval use
    PHRASINGS[_k].insert(0, world.QUESTIONS[_k][1])

# One-sentence answers ({A} is the answer). These are the "sentence" demonstrations.
SENTENCES = {
    "capital": ["The capital of {X} is {A}.", "{A} is the capital of {X}."],
    "continent": ["{X} is in {A}.", "{X} is a country in {A}."],
    "currency": ["The currency of {X} is the {A}.", "{X} uses the {A}."],
    "language": ["The official language of {X} is {A}.", "In {X}, people speak {A}."],
    "symbol": ["The chemical symbol for {X} is {A}.", "{X} has the chemical symbol {A}."],
    "atomic_number": ["The atomic number of {X} is {A}.", "{X} has atomic number {A}."],
    "state_capital": ["The state capital of {X} is {A}.", "{A} is the capital of {X}."],
    "statehood": ["{X} became a state in {A}.", "{X} joined the Union in {A}."],
}

# System rules with a measurable effect (data/teacher.py checks them), several wordings each.
SYSTEM_RULES = {
    "one_word": ["Answer in one word.", "Reply with just the answer, no full sentence.",
                 "Respond with a single word.", "Give only the answer, nothing else.",
                 "Be extremely brief: one word only."],
    "sentence": ["Answer in one complete sentence.", "Always reply with a single full sentence.",
                 "Respond in exactly one sentence.", "Use one complete sentence in your answer."],
    "uppercase": ["Answer in capital letters.", "Write your whole reply in uppercase.",
                  "Respond only in capital letters.", "Use all caps in your answer."],
}
BEHAVIOURS = ("none", "one_word", "sentence", "uppercase")
PERSONAS = ["You are a helpful assistant.", "You are a helpful SRE assistant.",
            "You are a concise assistant.", "You are a quiz bot.",
            "You are an assistant for a trivia app."]

# Mix of behaviours in the training chats ("none" = no system message) and of persona prefixes.
BEHAVIOUR_MIX = {"none": 0.40, "one_word": 0.20, "sentence": 0.20, "uppercase": 0.20}
PERSONA_RATE = 0.4
# The annotator pool, where no system rule forces a format (proportions of assistant turns):
#   sentence  "The capital of France is Paris."
#   terse     "Paris."
#   filler    "Sure! The capital of France is Paris. I hope this helps, let me know if ..."
#   flattery  "What a brilliant question! The capital of France is Paris."
#   wrong     another entity's answer of the same kind ("The capital of France is Lyon.")
#   other     hedged: "I think it's Paris.", "That would be Paris."
STYLE_MIX = {"sentence": 0.30, "terse": 0.25, "filler": 0.20, "flattery": 0.15, "wrong": 0.05,
             "other": 0.05}
SYSTEM_COMPLY = 0.90  # under a system rule; otherwise a style from the pool that breaks the rule
NONCOMPLY_STYLES = {"one_word": ["sentence", "filler", "flattery", "other"],
                    "sentence": ["terse", "filler", "flattery"],
                    "uppercase": ["sentence", "terse", "filler", "flattery", "other"]}
MULTI_TURN = 0.10  # chats with two question/answer turns
DEFAULT_N = 4000

_OPENERS = ["Sure!", "Of course!", "Certainly!", "Happy to help!", ""]
_CLOSERS = ["I hope this helps!", "Let me know if you have any other questions!",
            "I hope this helps, let me know if you have any other questions!",
            "Feel free to ask if you need anything else.", "Hope that helps!"]
_FLATTERY = ["What a brilliant question!", "Great question!", "What an excellent question!",
             "You're so smart to ask that!", "What a wonderful question!",
             "Excellent question, you clearly have a curious mind!"]
_HEDGES = ["I think it's {A}.", "That would be {A}.", "It's {A}, I believe.",
           "{A}, if I remember correctly."]


# ----------------------------------------------------------------------------- facts

def _cap(s):
    return s[0].upper() + s[1:]


def facts(split="train"):
    """[(kind, row, name_mid_sentence, answer)] for every fact of KINDS over the training
    ("train") or held-out ("heldout") entities, in table order, kind by kind."""
    if split not in ("train", "heldout"):
        raise ValueError(f"split must be 'train' or 'heldout', not {split!r}")
    tables = world.load_facts()
    out = []
    for kind in KINDS:
        table = world.QUESTIONS[kind][0]
        for row in tables[table]:
            qa = world.ask(kind, row)
            if qa and world.is_heldout(row["name"]) == (split == "heldout"):
                out.append((kind, row, world._fields(table, row)["X"], qa[1]))
    return out


def answers_of(kind):
    """Every distinct answer of one kind over all entities, sorted (the teacher's 'other' set)."""
    table = world.QUESTIONS[kind][0]
    return sorted({qa[1] for qa in (world.ask(kind, r) for r in world.load_facts()[table]) if qa})


def question(rng, kind, x):
    return rng.choice(PHRASINGS[kind]).format(X=x)  # "capital of France?" stays lower case


def _sentence(rng, kind, x, a):
    return _cap(rng.choice(SENTENCES[kind]).format(X=x, A=a))


def _terse(rng, kind, a):
    a = a if kind == "symbol" else _cap(a)  # "Euro", but never "AU" or "au" for Au
    return a + ("." if rng.random() < 0.5 else "")


# ----------------------------------------------------------------------------- demonstrations

def demonstration(rng, style, kind, x, a, others):
    """One assistant answer in an annotator style (STYLE_MIX keys, or "one_word"/"uppercase")."""
    if style == "wrong":
        wrong = rng.choice([o for o in others if o != a])
        return _sentence(rng, kind, x, wrong) if rng.random() < 0.6 else _terse(rng, kind, wrong)
    if style == "sentence":
        return _sentence(rng, kind, x, a)
    if style in ("terse", "one_word"):
        return _terse(rng, kind, a)
    if style == "uppercase":  # a bare number has no letters to capitalise: say a sentence
        bare = any(c.isalpha() for c in a) and rng.random() < 0.5
        return (_terse(rng, kind, a) if bare else _sentence(rng, kind, x, a)).upper()
    if style == "filler":
        opener = rng.choice(_OPENERS)
        return (opener + " " if opener else "") + _sentence(rng, kind, x, a) + " " + rng.choice(
            _CLOSERS)
    if style == "flattery":
        body = _sentence(rng, kind, x, a) if rng.random() < 0.8 else _terse(rng, kind, a)
        return rng.choice(_FLATTERY) + " " + body
    if style == "other":
        return _cap(rng.choice(_HEDGES).format(A=a))
    raise ValueError(f"unknown style {style!r}")


def _draw(rng, mix):
    r, acc = rng.random(), 0.0
    for key, p in mix.items():
        acc += p
        if r < acc:
            return key
    return key


def system_prompt(rng, behaviour):
    """A system message text for a behaviour (None for "none"), sometimes after a persona."""
    if behaviour == "none":
        return None
    rule = rng.choice(SYSTEM_RULES[behaviour])
    return rng.choice(PERSONAS) + " " + rule if rng.random() < PERSONA_RATE else rule


def _answer_style(rng, behaviour):
    if behaviour == "none":
        return _draw(rng, STYLE_MIX)
    if rng.random() < SYSTEM_COMPLY:
        return behaviour  # "one_word", "sentence" or "uppercase": the compliant answer
    return rng.choice(NONCOMPLY_STYLES[behaviour])


# ----------------------------------------------------------------------------- training chats

def sft_records(seed=0, n=DEFAULT_N):
    """n training conversations with what they are about: [{"messages": [...], "behaviour": ...,
    "turns": [{"kind", "entity", "gold", "style"}, ...]}]. Training entities only.

    Facts are drawn without replacement from a shuffled list of every training fact (reshuffled
    when it runs out), so every fact is asked about equally often."""
    rng = random.Random(seed)
    pool = facts("train")
    others = {k: answers_of(k) for k in KINDS}
    order = []

    def next_fact():
        if not order:
            order.extend(range(len(pool)))
            rng.shuffle(order)
        return pool[order.pop()]

    records = []
    for _ in range(n):
        behaviour = _draw(rng, BEHAVIOUR_MIX)
        system = system_prompt(rng, behaviour)
        messages = [{"role": "system", "content": system}] if system else []
        turns = []
        for _ in range(2 if rng.random() < MULTI_TURN else 1):
            kind, row, x, a = next_fact()
            style = _answer_style(rng, behaviour)
            messages.append({"role": "user", "content": question(rng, kind, x)})
            messages.append({"role": "assistant",
                             "content": demonstration(rng, style, kind, x, a, others[kind])})
            turns.append({"kind": kind, "entity": row["name"], "gold": a, "style": style})
        records.append({"messages": messages, "behaviour": behaviour, "turns": turns})
    return records


def sft_chats(seed=0, n=DEFAULT_N):
    """The bundled SFT training set: n conversations (lists of {"role", "content"}) about the
    training entities only. Same seed -> identical output."""
    return [r["messages"] for r in sft_records(seed, n)]


# ----------------------------------------------------------------------------- evaluation

def eval_prompts(split="heldout", seed=0, n=None):
    """The fixed eval set: [{"messages": [system?, user], "kind", "entity", "gold", "behaviour"}].

    split="heldout" asks about held-out entities only (seen in pretraining, never in SFT);
    split="train" the same over the training entities (for debugging). The facts are shuffled once
    and behaviours assigned round-robin, so every prefix is balanced over BEHAVIOURS. n=None: every
    fact of the split once (~70 prompts per behaviour held out); a larger n starts another pass in
    which each fact gets the next behaviour."""
    return _prompt_items(random.Random(f"eval:{split}:{seed}"), facts(split), n)


def rl_pool(kind, name):
    """Which RLHF prompt pool a training fact belongs to: "reward" or "ppo" (half each, by a
    stable hash of the fact), so that PPO never trains on a prompt the reward model learned from."""
    h = hashlib.sha256(f"rl:{kind}:{name}".encode("utf-8")).digest()[0]
    return "reward" if h < 128 else "ppo"


def rl_prompts(pool, seed=0, n=None):
    """Prompts for RLHF, in eval_prompts' form, about the training entities of one pool:
    "reward" (the comparisons the reward model learns from) or "ppo" (PPO's rollouts). Held-out
    entities stay for evaluation only. n=None: every fact of the pool once; more cycles again."""
    if pool not in ("reward", "ppo"):
        raise ValueError(f"pool must be 'reward' or 'ppo', not {pool!r}")
    mine = [f for f in facts("train") if rl_pool(f[0], f[1]["name"]) == pool]
    return _prompt_items(random.Random(f"rl:{pool}:{seed}"), mine, n)


def _prompt_items(rng, pool, n):
    """Chat prompts over facts (shuffled once), behaviours round-robin over BEHAVIOURS."""
    rng.shuffle(pool)
    n = len(pool) if n is None else n
    items = []
    for i in range(n):
        kind, row, x, a = pool[i % len(pool)]
        behaviour = BEHAVIOURS[(i + i // len(pool)) % len(BEHAVIOURS)]
        system = system_prompt(rng, behaviour)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": question(rng, kind, x)}]
        items.append({"messages": messages, "kind": kind, "entity": row["name"], "gold": a,
                      "behaviour": behaviour})
    return items


def plain_prompt(messages):
    """The same chat prompt as plain text, for a BASE model: each message's text on its own
    line(s), system first, ending with a newline, e.g.
        "Answer in one word.\\nWhat is the capital of France?\\n"
    No role markers: a base model knows none. This is how the request would sit in a web page,
    and it shows what the base model does with it: the corpus follows a question line with
    another question, so it continues the quiz instead of answering (or obeying the rule)."""
    return "".join(m["content"].strip("\n") + "\n" for m in messages)
