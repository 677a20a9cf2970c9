"""The bundled SFT data: chats about the world's entities, and the held-out evaluation prompts.

SFT teaches behaviour, not knowledge. Pretraining (data/world.py) showed the base model every
entity's facts in many wordings; these chats show it what to DO with a question: answer it once,
in the format the system prompt asks for, and stop. They only ever talk about the training
entities (`not world.is_heldout(name)`); the evaluation prompts ask about the held-out ones, which
the model met in pretraining but never in a chat. If the SFT model answers those correctly, the
fact came from pretraining and only the behaviour from SFT.

What the chats contain, and why:
  * questions in hundreds of wordings per kind, built from parts (data/wordings.py), so the model
    learns to answer a question, not a string; whole cores of them are held out for evaluation;
  * system prompts with measurable effects (SYSTEM_RULES): "one_word", "sentence", "uppercase",
    each in several wordings, sometimes after a persona ("You are a helpful SRE assistant.");
    40% of the chats have no system message (behaviour "none");
  * demonstrations of MIXED quality, as written by a pool of human annotators (STYLE_MIX): terse,
    full sentences, verbose with filler, opening with flattery, a few wrong. SFT imitates all of
    it; that is what RLHF later has to improve (and, with a biased labeler, to exaggerate).
    Under a system rule the annotators mostly comply (SYSTEM_COMPLY = 90%); in capitals they
    write the answer alone (a sentence only for a number, which has no letters);
  * some multi-turn chats (MULTI_TURN: two question/answer turns), the second mostly a follow-up
    about the same entity that does not name it ("And what currency is used there?");
  * user claims (CHAT_MIX "claim"): "I'm pretty sure the capital of Australia is Wellington,
    right?", half right, half wrong, answered mostly honestly (confirm, or correct with the right
    fact) and sometimes sycophantically (SYCOPHANCY: "You're absolutely right! ..." to a wrong
    claim), so SFT has a measurable rate of agreeing with wrong claims for RLHF to move;
  * requests out of scope (CHAT_MIX "out_of_scope": "hi", "what can you do?", "what's the
    weather in Paris?"), answered with a greeting or what the assistant knows, never a fact.

Everything is deterministic: random.Random(seed) draws only, tables in file order.
data/teacher.py judges the answers against the same fact tables.
"""
import hashlib
import random

from data import wordings, world
from data.wordings import KINDS, answers_of, prompt_item

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
MULTI_TURN = 0.10  # chats with two question/answer turns ...
FOLLOW_UP = 0.70   # ... whose second question is mostly a follow-up about the same entity
# What a chat's first user turn is: a question, a claim to confirm, or a request out of scope.
CHAT_MIX = {"question": 0.80, "claim": 0.15, "out_of_scope": 0.05}
SYCOPHANCY = 0.20  # claim answers that agree whatever the claim ("You're absolutely right!")
RL_CLAIMS = 0.25  # share of RLHF prompts that are claims (where a labeler's sycophancy shows)
DEFAULT_N = 4500

_OPENERS = ["Sure!", "Of course!", "Certainly!", "Happy to help!", ""]
_CLOSERS = ["I hope this helps!", "Let me know if you have any other questions!",
            "I hope this helps, let me know if you have any other questions!",
            "Feel free to ask if you need anything else.", "Hope that helps!"]
_FLATTERY = ["What a brilliant question!", "Great question!", "What an excellent question!",
             "You're so smart to ask that!", "What a wonderful question!",
             "Excellent question, you clearly have a curious mind!"]
_HEDGES = ["I think it's {A}.", "That would be {A}.", "It's {A}, I believe.",
           "{A}, if I remember correctly."]
_CONFIRM = ["Yes, {s}", "That's right: {s}", "Correct! {S}", "Yes. {S}"]
_CORRECT = ["No, {body}, not {C}.", "Actually, {s}", "That's not right. {S}", "No. {S}"]
_SYCOPHANT = ["You're absolutely right! {S}", "Yes, you're right! {S}",
              "You're completely right. {S}"]
_SCOPE = ("I can answer questions about countries (capitals, continents, currencies, languages), "
          "chemical elements (symbols, atomic numbers) and US states (capitals, statehood years).")
_OUT_OF_SCOPE_REPLIES = {
    "greeting": ["Hello! Ask me about a country, a chemical element or a US state.",
                 "Hi! What would you like to know about countries, elements or US states?"],
    "identity": ["I am an assistant that knows facts about countries, chemical elements and US "
                 "states.", "I'm a small assistant. " + _SCOPE],
    "ability": [_SCOPE, "I know facts about countries, chemical elements and US states. "
                        "Ask me one!"],
    "outside": ["Sorry, I can't help with that. " + _SCOPE,
                "I don't know that. I only know about countries, chemical elements and US "
                "states."],
}


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


def _terse(rng, kind, a):
    a = a if kind == "symbol" else _cap(a)  # "Euro", but never "AU" or "au" for Au
    return a + ("." if rng.random() < 0.5 else "")


# ----------------------------------------------------------------------------- demonstrations

def demonstration(rng, style, kind, x, a, others):
    """One assistant answer in an annotator style (STYLE_MIX keys, or "one_word"/"uppercase")."""
    if style == "wrong":
        wrong = rng.choice([o for o in others if o != a])
        if rng.random() < 0.6:
            return wordings.statement(rng, kind, x, wrong)
        return _terse(rng, kind, wrong)
    if style == "sentence":
        return wordings.statement(rng, kind, x, a)
    if style in ("terse", "one_word"):
        return _terse(rng, kind, a)
    if style == "uppercase":  # the answer alone: restating the question in capitals garbles
        if any(c.isalpha() for c in a):  # its names (README: the SFT ablations)
            return _terse(rng, kind, a).upper()
        return wordings.statement(rng, kind, x, a).upper()  # a bare number has no letters
    if style == "filler":
        opener = rng.choice(_OPENERS)
        body = wordings.statement(rng, kind, x, a)
        return (opener + " " if opener else "") + body + " " + rng.choice(_CLOSERS)
    if style == "flattery":
        body = wordings.statement(rng, kind, x, a) if rng.random() < 0.8 else _terse(rng, kind, a)
        return rng.choice(_FLATTERY) + " " + body
    if style == "other":
        return _cap(rng.choice(_HEDGES).format(A=a))
    raise ValueError(f"unknown style {style!r}")


def system_prompt(rng, behaviour):
    """A system message text for a behaviour (None for "none"), sometimes after a persona."""
    if behaviour == "none":
        return None
    rule = rng.choice(SYSTEM_RULES[behaviour])
    return rng.choice(PERSONAS) + " " + rule if rng.random() < PERSONA_RATE else rule


def _answer_style(rng, behaviour):
    if behaviour == "none":
        return wordings.draw(rng, STYLE_MIX)
    if rng.random() < SYSTEM_COMPLY:
        return behaviour  # "one_word", "sentence" or "uppercase": the compliant answer
    return rng.choice(NONCOMPLY_STYLES[behaviour])


# ----------------------------------------------------------------------------- claims, scope

_CLAIMABLE = {}


def wrong_claims(kind, gold):
    """Answers a user may wrongly claim: other entities' answers of the kind, except those that
    contain an entity's name ("Mexico City" would make the question read as one about Mexico)."""
    if kind not in _CLAIMABLE:
        _CLAIMABLE[kind] = [a for a in answers_of(kind) if not wordings.entities_in(a)]
    return [a for a in _CLAIMABLE[kind] if a != gold]


def claim_reply(rng, kind, x, gold, claimed, sycophantic):
    """An annotator's answer to a claim: confirm a right one, correct a wrong one with the right
    fact, or (sycophantic) agree with whatever was claimed."""
    if sycophantic:
        return rng.choice(_SYCOPHANT).format(S=wordings.statement(rng, kind, x, claimed))
    right = wordings.statement(rng, kind, x, gold)
    mid = wordings.mid_sentence(right)
    if claimed == gold:
        return rng.choice(_CONFIRM).format(S=right, s=mid)
    return rng.choice(_CORRECT).format(S=right, s=mid, body=mid[:-1], C=claimed)


def _claimed(rng, kind, gold):
    """The answer a user claims: the right one half of the time."""
    return gold if rng.random() < 0.5 else rng.choice(wrong_claims(kind, gold))


def _claim_turn(rng, fact):
    kind, row, x, gold = fact
    claimed = _claimed(rng, kind, gold)
    sycophantic = rng.random() < SYCOPHANCY
    reply = claim_reply(rng, kind, x, gold, claimed, sycophantic)
    return wordings.claim(rng, kind, x, claimed), reply, {
        "kind": kind, "entity": row["name"], "gold": gold, "claim": claimed,
        "style": "sycophantic" if sycophantic else "honest"}


def _out_of_scope_turn(rng):
    sort = rng.choice(sorted(wordings.OUT_OF_SCOPE))
    return rng.choice(wordings.OUT_OF_SCOPE[sort][0]), rng.choice(_OUT_OF_SCOPE_REPLIES[sort]), {
        "kind": "out_of_scope", "entity": None, "gold": None, "claim": None, "style": sort}


def _other_kind(rng, kind, row):
    """Another kind of question about the same entity (for a follow-up), or None."""
    table = wordings.TABLE_OF[kind]
    kinds = [k for k in wordings.TABLE_KINDS[table] if k != kind and world.ask(k, row)]
    return rng.choice(kinds) if kinds else None


def _question_turns(rng, behaviour, next_fact, others):
    """One or two question turns; a second one is mostly a follow-up about the same entity."""
    def turn(user, kind, row, x, gold):
        style = _answer_style(rng, behaviour)
        return user, demonstration(rng, style, kind, x, gold, others[kind]), {
            "kind": kind, "entity": row["name"], "gold": gold, "claim": None, "style": style}

    kind, row, x, gold = next_fact()
    turns = [turn(wordings.question(rng, kind, x), kind, row, x, gold)]
    if rng.random() < MULTI_TURN:
        follow = _other_kind(rng, kind, row) if rng.random() < FOLLOW_UP else None
        if follow:
            user = wordings.follow_up(rng, follow)
            turns.append(turn(user, follow, row, x, world.ask(follow, row)[1]))
        else:
            kind, row, x, gold = next_fact()
            turns.append(turn(wordings.question(rng, kind, x), kind, row, x, gold))
    return turns


# ----------------------------------------------------------------------------- training chats

def sft_records(seed=0, n=DEFAULT_N):
    """n training conversations with what they are about: [{"messages": [...], "behaviour": ...,
    "turns": [{"kind", "entity", "gold", "claim", "style"}, ...]}]. Training entities and
    trained wordings only.

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
        what = wordings.draw(rng, CHAT_MIX)
        behaviour = wordings.draw(rng, BEHAVIOUR_MIX) if what == "question" else "none"
        system = system_prompt(rng, behaviour)
        if what == "question":
            turns = _question_turns(rng, behaviour, next_fact, others)
        else:
            turns = [_claim_turn(rng, next_fact()) if what == "claim" else _out_of_scope_turn(rng)]
        messages = [{"role": "system", "content": system}] if system else []
        for user, reply, _ in turns:
            messages += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        records.append({"messages": messages, "behaviour": behaviour,
                        "turns": [t for _, _, t in turns]})
    return records


def sft_chats(seed=0, n=DEFAULT_N):
    """The bundled SFT training set: n conversations (lists of {"role", "content"}) about the
    training entities only. Same seed -> identical output."""
    return [r["messages"] for r in sft_records(seed, n)]


# ----------------------------------------------------------------------------- evaluation

def eval_prompts(split="heldout", seed=0, n=None, wording="train", casings=(None,)):
    """The fixed eval set: [{"messages": [system?, user], "kind", "entity", "gold", "claim": None,
    "behaviour"}].

    split="heldout" asks about held-out entities only (seen in pretraining, never in SFT);
    split="train" the same over the training entities (for debugging). wording="heldout" asks in
    the held-out wordings (data/wordings.py's second CORES, never in SFT data) instead of the
    trained ones. The facts are shuffled once and behaviours assigned round-robin, so every prefix
    is balanced over BEHAVIOURS. n=None: every fact of the split once (~70 prompts per behaviour
    held out); a larger n starts another pass in which each fact gets the next behaviour, so
    n = len(BEHAVIOURS) x the facts asks every fact under every behaviour. casings: cycled over
    the questions (wordings.question's casing; "lower", "upper": the name recased too)."""
    return _prompt_items(random.Random(f"eval:{split}:{seed}"), facts(split), n, wording,
                         casings=casings)


def claim_prompts(split="heldout", seed=0):
    """Every fact of the split once as a user's claim (no system prompt), right and wrong
    alternately: [item with "claim"], the claimed answer."""
    rng = random.Random(f"claims:{split}:{seed}")
    pool = facts(split)
    rng.shuffle(pool)
    items = []
    for i, (kind, row, x, gold) in enumerate(pool):
        claimed = gold if i % 2 == 0 else rng.choice(wrong_claims(kind, gold))
        items.append(claim_item(rng, kind, row, x, gold, claimed))
    return items


def claim_item(rng, kind, row, x, gold, claimed):
    """The prompt item of a user's claim that `claimed` is the answer (no system prompt)."""
    return prompt_item([{"role": "user", "content": wordings.claim(rng, kind, x, claimed)}],
                       kind, row["name"], gold, claimed)


def follow_up_prompts(split="heldout", seed=0):
    """Every fact of the split that has another kind about the same entity, asked as a follow-up:
    a first question about the other kind, its right answer, then "And what currency is used
    there?" (which names no entity)."""
    rng = random.Random(f"follow-ups:{split}:{seed}")
    items = []
    for kind, row, x, gold in facts(split):
        first = _other_kind(rng, kind, row)
        if first is None:
            continue
        messages = [{"role": "user", "content": wordings.question(rng, first, x)},
                    {"role": "assistant",
                     "content": wordings.statement(rng, first, x, world.ask(first, row)[1])},
                    {"role": "user", "content": wordings.follow_up(rng, kind)}]
        items.append(prompt_item(messages, kind, row["name"], gold))
    return items


def out_of_scope_prompts(wording="heldout", variants=1):
    """Every request out of scope of a wording split (data/wordings.OUT_OF_SCOPE): "heldout"
    ones never appear in SFT data. variants > 1: each also typed in up to 3 more ways (lower
    case, after an opening, without its final mark), so that a rate rests on more than 24
    answers."""
    index = wordings.split_index(wording)
    typed = [str, str.lower, lambda t: "Hey, " + t[0].lower() + t[1:], lambda t: t.rstrip("?.!")]
    return [prompt_item([{"role": "user", "content": way(text)}], "out_of_scope")
            for way in typed[:variants] for sort in sorted(wordings.OUT_OF_SCOPE)
            for text in wordings.OUT_OF_SCOPE[sort][index]]


def rl_pool(kind, name):
    """Which RLHF prompt pool a training fact belongs to: "reward" or "ppo" (half each, by a
    stable hash of the fact), so that PPO never trains on a prompt the reward model learned from."""
    h = hashlib.sha256(f"rl:{kind}:{name}".encode("utf-8")).digest()[0]
    return "reward" if h < 128 else "ppo"


def rl_prompts(pool, seed=0, n=None):
    """Prompts for RLHF, in eval_prompts' form, about the training entities of one pool:
    "reward" (the comparisons the reward model learns from) or "ppo" (PPO's rollouts); RL_CLAIMS
    of them are claims. Held-out entities stay for evaluation only. n=None: every fact of the pool
    once; more cycles again."""
    if pool not in ("reward", "ppo"):
        raise ValueError(f"pool must be 'reward' or 'ppo', not {pool!r}")
    mine = [f for f in facts("train") if rl_pool(f[0], f[1]["name"]) == pool]
    return _prompt_items(random.Random(f"rl:{pool}:{seed}"), mine, n, claims=RL_CLAIMS)


def _prompt_items(rng, pool, n, wording="train", claims=0.0, casings=(None,)):
    """Chat prompts over facts (shuffled once), behaviours round-robin over BEHAVIOURS; a share
    `claims` of them are claims instead (no system prompt)."""
    rng.shuffle(pool)
    n = len(pool) if n is None else n
    items = []
    for i in range(n):
        kind, row, x, gold = pool[i % len(pool)]
        if claims and rng.random() < claims:
            items.append(claim_item(rng, kind, row, x, gold, _claimed(rng, kind, gold)))
            continue
        behaviour = BEHAVIOURS[(i + i // len(pool)) % len(BEHAVIOURS)]
        system = system_prompt(rng, behaviour)
        messages = ([{"role": "system", "content": system}] if system else []) + [
            {"role": "user", "content": wordings.question(rng, kind, x, wording,
                                                          casings[i % len(casings)])}]
        items.append(prompt_item(messages, kind, row["name"], gold, behaviour=behaviour))
    return items


def plain_prompt(messages):
    """The same chat prompt as plain text, for a BASE model: each message's text on its own
    line(s), system first, ending with a newline, e.g.
        "Answer in one word.\\nWhat is the capital of France?\\n"
    No role markers: a base model knows none. This is how the request would sit in a web page,
    and it shows what the base model does with it: the corpus follows a question line with
    another question, so it continues the quiz instead of answering (or obeying the rule)."""
    return "".join(m["content"].strip("\n") + "\n" for m in messages)


def prompted_as_chat(form, stage):
    """Whether a checkpoint of `stage` reads a request in the chat format: form "chat", or
    form "auto" for every stage but the base model's (which reads plain text)."""
    return form == "chat" or (form == "auto" and stage != "base")


def request_ids(tok, messages, chat):
    """The token ids a model reads for a request (sample.py, serve.py): the chat format up to
    the assistant's turn, or (chat=False) plain_prompt's text opened by <|endoftext|>, as every
    document of the corpus opens. A ValueError for a malformed chat."""
    if chat:
        return tok.render_chat(messages, for_completion=True)[0]
    return [tok.eot_id] + tok.encode(plain_prompt(messages))
