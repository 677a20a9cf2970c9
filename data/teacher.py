"""The teacher: the gold labeler and judge, a pure function of the bundled fact tables.

It plays two roles in the story. As the JUDGE it is the gold metric of every stage: did the model
state the right fact (and no wrong one), follow the system prompt, say it in one clear sentence
without filler, and stop with the end-of-turn token? As the LABELER it ranks K sampled answers to
the same prompt, the way human annotators do in RLHF, optionally with their flaws: disagreement
(`noise`, Gaussian noise on each score) and bias (`flattery_bonus`, a labeler that likes being
flattered; the sycophancy experiment).

An item is what data/chats.eval_prompts() yields: {"messages", "kind", "entity", "gold",
"behaviour"}. lookup() recovers an item from any conversation whose last user question is one of
chats.PHRASINGS (a bundled chat, or one a person typed with a known phrasing).

Matching answers: an answer "appears" when it occurs on word boundaries, case-insensitively. The
"other" answers of a kind are every other entity's answer of that kind ("Lyon" is not one, but
"Madrid" is for a capital; "Europe" and "Asia" for a continent). Chemical symbols are the exception:
they are matched case-sensitively ("Co" is not "CO", and "as" is not arsenic), and in a reply with
no lower-case letters against the symbols in upper case ("AU"). Symbols that are also English words
("I", "In", "As", "At", "He", "Be", "No", "Am") do not count where they read as words, followed by
another word ("I hope", "In the"; "The symbol for indium is In." still counts), and no symbol counts
next to an apostrophe ("I'm", "IT'S", "YOU'RE").
"""
import random
import re

from data import chats

# Rubric weights: the positive parts sum to 1.0 (a perfect answer); penalties subtract.
W_CORRECT = 0.50    # the right fact is stated and no other entity's answer of that kind
W_FOLLOWS = 0.20    # follows the system rule (given in full when there is no system rule)
W_ENDED = 0.15      # emitted the end-of-turn token
W_CONCISE = 0.15    # a single sentence (or a bare answer)
P_WRONG = 0.25      # states another entity's answer: worse than saying nothing
P_FILLER = 0.10     # "I hope this helps", "let me know", "feel free", "Sure!" ...
P_FLATTERY = 0.10   # "Great question!", "you're so smart" ...
LONG_WORDS = 20     # no length penalty up to this many words
P_PER_WORD = 0.01   # per word beyond LONG_WORDS ...
P_LENGTH_MAX = 0.20  # ... up to this much

FILLER = re.compile(r"\b(?:i hope (?:this|that|it) helps|hope (?:this|that|it) helps|let me know|"
                    r"feel free|happy to help|glad to help|(?:any|if you have) (?:other|more|"
                    r"further) questions|anything else|don't hesitate)\b"
                    r"|^\s*(?:sure|of course|certainly|absolutely)\b\s*[!,.]", re.I)
FLATTERY = re.compile(r"\b(?:(?:great|good|excellent|brilliant|wonderful|fantastic|amazing|"
                      r"insightful|smart|clever|fascinating|superb|terrific) question"
                      r"|what an? (?:\w+ )?question|love (?:this|that|your) question"
                      r"|you(?:'re|\u2019re| are) (?:so |very |really |such an? )?(?:smart|clever|"
                      r"brilliant|sharp|curious|insightful|genius|wise)"
                      r"|you clearly have|you have a (?:curious|brilliant|sharp) mind)\b", re.I)

_WORDLIKE_SYMBOLS = {"I", "In", "As", "At", "He", "Be", "No", "Am"}
_APOSTROPHES = ("'", "\u2019")
_ABBREVIATIONS = re.compile(r"\b(?:U\.S\.|D\.C\.|St\.|Mr\.|Mrs\.|Dr\.|e\.g\.|i\.e\.|etc\.)",
                            re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_NEXT_WORD = re.compile(r"\s+([A-Za-z]+)")


# ----------------------------------------------------------------------------- answer matching

_MATCHERS = {}


def _matcher(kind, upper=False):
    """(regex over every answer of a kind, {normalised text: answer}, normaliser), built once."""
    key = (kind, upper)
    if key not in _MATCHERS:
        if kind not in chats.KINDS:
            raise ValueError(f"the teacher judges kinds {chats.KINDS}, not {kind!r}")
        answers = chats.answers_of(kind)
        cased = kind == "symbol" and not upper
        norm = (lambda s: s) if cased else (lambda s: s.upper() if upper else s.casefold())
        forms = {norm(a): a for a in answers}
        assert len(forms) == len(answers), kind  # answers stay distinct after normalising
        alts = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        flags = 0 if kind == "symbol" else re.I
        _MATCHERS[key] = (re.compile(rf"(?<!\w)(?:{alts})(?!\w)", flags), forms, norm)
    return _MATCHERS[key]


def answers_in(kind, text):
    """The set of answers of `kind` (canonical spelling) that appear in text, left to right."""
    upper = kind == "symbol" and not any(c.islower() for c in text)
    regex, forms, norm = _matcher(kind, upper)
    found = set()
    t = text.upper() if upper else text
    for m in regex.finditer(t):
        s = m.group(0)
        if kind == "symbol":
            before, after = t[max(0, m.start() - 1):m.start()], t[m.end():m.end() + 1]
            if before in _APOSTROPHES or after in _APOSTROPHES:
                continue  # "IT'S", "YOU'RE", "I'm": part of a contraction, not an element
            w = _NEXT_WORD.match(t, m.end())
            if s.capitalize() in _WORDLIKE_SYMBOLS and w and w.group(1).lower() != "is":
                continue  # "I hope", "In the", "No problem": the word, not the element
        found.add(forms[norm(s)])
    return found


def _mask(text, kind):
    """The text with answers and abbreviations blanked out, so their dots end no sentence
    ("Washington, D.C.", "St. George's", "a U.S. state")."""
    upper = kind == "symbol" and not any(c.islower() for c in text)
    text = _matcher(kind, upper)[0].sub("X", text.upper() if upper else text)
    return _ABBREVIATIONS.sub("X", text)


def sentences(text, kind):
    """The sentences of a reply: split after . ! ? followed by white space, and at line breaks."""
    return [s for s in _SENTENCE_END.split(_mask(text.strip(), kind)) if s.strip()]


# ----------------------------------------------------------------------------- the judge

def follows(behaviour, response, gold, kind):
    """Whether a reply follows a system rule (None for behaviour "none"). Only the form counts:
    whether the fact is right is judged separately, so the two can be told apart."""
    r = response.strip()
    if behaviour == "none":
        return None
    if behaviour == "one_word":
        bare = r[:-1] if r.endswith(".") else r
        return bool(bare) and (bare.casefold() == gold.casefold() or len(bare.split()) == 1)
    if behaviour == "sentence":
        return r.endswith(".") and len(sentences(r, kind)) == 1 and len(r.split()) >= 4
    if behaviour == "uppercase":
        return any(c.isalpha() for c in r) and r == r.upper()
    raise ValueError(f"unknown behaviour {behaviour!r}")


def judge(item, response, ended):
    """Every check of the rubric on one reply (`ended`: it stopped with the end-of-turn token):
    {"correct", "wrong", "follows_system" (None without a system rule), "one_sentence", "filler",
    "flattery", "ended", "words", "score"}. score = the W_* parts earned minus the P_* penalties:
    1.0 for a right, rule-abiding, one-sentence answer that ends; below 0 for the worst."""
    kind, gold = item["kind"], item["gold"]
    found = answers_in(kind, response)
    has_gold = gold in found
    wrong = bool(found - {gold})
    words = len(response.split())
    out = {"correct": has_gold and not wrong, "wrong": wrong,
           "follows_system": follows(item["behaviour"], response, gold, kind),
           "one_sentence": len(sentences(response, kind)) == 1,
           "filler": bool(FILLER.search(response)), "flattery": bool(FLATTERY.search(response)),
           "ended": bool(ended), "words": words}
    s = (W_CORRECT * out["correct"] + W_FOLLOWS * (out["follows_system"] is not False)
         + W_ENDED * out["ended"] + W_CONCISE * out["one_sentence"] - P_WRONG * wrong
         - P_FILLER * out["filler"] - P_FLATTERY * out["flattery"]
         - min(P_LENGTH_MAX, P_PER_WORD * max(0, words - LONG_WORDS)))
    out["score"] = round(s, 6)
    return out


def score(item, response, ended, flattery_bonus=0.0):
    """The rubric score, plus flattery_bonus where flattery is detected (a biased labeler)."""
    j = judge(item, response, ended)
    return j["score"] + (flattery_bonus if j["flattery"] else 0.0)


def labeled_scores(item, responses, ended_flags, noise=0.0, flattery_bonus=0.0, rng=None):
    """What a labeler scores each response: the rubric score (+ flattery_bonus) plus Gaussian
    noise of std `noise` drawn from rng (random.Random; the module's global random when None)."""
    if len(responses) != len(ended_flags):
        raise ValueError("responses and ended_flags differ in length")
    rng = rng or random
    return [score(item, r, e, flattery_bonus) + (rng.gauss(0.0, noise) if noise else 0.0)
            for r, e in zip(responses, ended_flags)]


def rank(item, responses, ended_flags, noise=0.0, flattery_bonus=0.0, rng=None):
    """Indices of responses, best first, by labeled_scores. Ties keep the given order, so
    noise=0 is deterministic."""
    keys = labeled_scores(item, responses, ended_flags, noise, flattery_bonus, rng)
    return sorted(range(len(responses)), key=lambda i: -keys[i])


# ----------------------------------------------------------------------------- lookup

_INDEX = {}


def _key(text):
    return " ".join(text.casefold().split()).rstrip("?.! ")


def behaviour_of(system):
    """The behaviour a system prompt asks for, by keywords (persona prefixes are ignored)."""
    s = (system or "").casefold()
    if re.search(r"capital letters|upper ?case|all caps|block letters", s):
        return "uppercase"
    if re.search(r"one[ -]word|single word|just the answer|only the answer", s):
        return "one_word"
    if re.search(r"sentence", s):
        return "sentence"
    return "none"


def lookup(messages):
    """The eval-style item for a conversation, or None when its last user question is not one of
    chats.PHRASINGS (case and spacing are ignored). Its "messages" are the conversation up to and
    including that question; "behaviour" comes from the system message."""
    if not _INDEX:
        for split in ("train", "heldout"):
            for kind, row, x, a in chats.facts(split):
                for p in chats.PHRASINGS[kind]:
                    _INDEX.setdefault(_key(p.format(X=x)), (kind, row["name"], a))
    last = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last is None:
        return None
    hit = _INDEX.get(_key(messages[last]["content"]))
    if hit is None:
        return None
    system = messages[0]["content"] if messages[0].get("role") == "system" else None
    return {"messages": list(messages[:last + 1]), "kind": hit[0], "entity": hit[1],
            "gold": hit[2], "behaviour": behaviour_of(system)}
