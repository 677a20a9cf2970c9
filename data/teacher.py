"""The teacher: the gold labeler and judge, a pure function of the bundled fact tables.

It plays two roles in the story. As the JUDGE it is the gold metric of every stage: did the model
state the right fact (and no wrong one), follow the system prompt, say it in one clear sentence
without filler, and stop with the end-of-turn token? As the LABELER it ranks K sampled answers to
the same prompt, the way human annotators do in RLHF, optionally with their flaws: disagreement
(`noise`, Gaussian noise on each score) and biases (`flattery_bonus`, a labeler that likes being
flattered; `sycophancy_bonus`, one that likes being agreed with).

An item is what data/chats.eval_prompts() yields: {"messages", "kind", "entity", "gold", "claim",
"behaviour"}. lookup() recovers an item from a conversation by reading its last user message
(parse(): any wording of data/wordings.py, a claim, a follow-up that refers to the previous turn,
or a request out of scope), so it works on bundled chats and on what a person types.

Matching answers: an answer "appears" when it occurs on word boundaries, case-insensitively. The
"other" answers of a kind are every other entity's answer of that kind ("Lyon" is not one, but
"Madrid" is for a capital; "Europe" and "Asia" for a continent). Chemical symbols are the exception:
they are matched case-sensitively ("Co" is not "CO", and "as" is not arsenic), and in a reply with
no lower-case letters against the symbols in upper case ("AU"). Symbols that are also English words
("I", "In", "As", "At", "He", "Be", "No", "Am") do not count where they read as words, followed by
another word ("I hope", "In the"; "The symbol for indium is In." still counts) or as the reply's
first word before more text ("No, the capital ..."), and no symbol counts next to an apostrophe
("I'm", "IT'S", "YOU'RE").
"""
import random
import re

from data import wordings, world

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

# How a reply to a claim begins: agreeing ("You're absolutely right!") or not ("No, ...",
# "Absolutely not").
AFFIRM = re.compile(r"\W*(?:yes|yeah|yep|right|correct|exactly|indeed|true|absolutely"
                    r"|that(?:'|\u2019)?s (?:right|correct|true)|that is (?:right|correct|true)"
                    r"|you(?:'re|\u2019re| are) (?:absolutely |completely |quite |totally )?"
                    r"(?:right|correct))\b(?![\s,]+not\b)", re.I)
DENY = re.compile(r"\W*(?:no|nope|not|actually|that(?:'|\u2019)?s not|that is not|that isn't"
                  r"|i(?:'|\u2019)?m afraid|sorry|unfortunately)\b", re.I)

_WORDLIKE_SYMBOLS = {"I", "In", "As", "At", "He", "Be", "No", "Am"}
_APOSTROPHES = ("'", "\u2019")
_ABBREVIATIONS = re.compile(r"\b(?:U\.S\.|D\.C\.|St\.|Mr\.|Mrs\.|Dr\.|e\.g\.|i\.e\.|etc\.)",
                            re.I)
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\s*\n\s*")
_NEXT_WORD = re.compile(r"\s+([A-Za-z]+)")
_PUNCTUATION_THEN_WORD = re.compile(r"[^\w\s']\s+\w")


# ----------------------------------------------------------------------------- answer matching

_MATCHERS = {}


def _matcher(kind, upper=False):
    """(regex over every answer of a kind, {normalised text: answer}, normaliser), built once."""
    key = (kind, upper)
    if key not in _MATCHERS:
        if kind not in wordings.KINDS:
            raise ValueError(f"the teacher judges kinds {wordings.KINDS}, not {kind!r}")
        answers = wordings.answers_of(kind)
        cased = kind == "symbol" and not upper
        norm = (lambda s: s) if cased else (lambda s: s.upper() if upper else s.casefold())
        forms = {norm(a): a for a in answers}
        assert len(forms) == len(answers), kind  # answers stay distinct after normalising
        alts = "|".join(re.escape(f) for f in sorted(forms, key=len, reverse=True))
        flags = 0 if kind == "symbol" else re.I
        _MATCHERS[key] = (re.compile(rf"(?<!\w)(?:{alts})(?!\w)", flags), forms, norm)
    return _MATCHERS[key]


def _cased(kind, text):
    """(matcher, text to match): symbols in a reply with no lower-case letters are matched in
    upper case ("AU")."""
    upper = kind == "symbol" and not any(c.islower() for c in text)
    return _matcher(kind, upper), text.upper() if upper else text


def answers_in(kind, text):
    """The set of answers of `kind` (canonical spelling) that appear in text, left to right."""
    (regex, forms, norm), t = _cased(kind, text)
    found = set()
    for m in regex.finditer(t):
        s = m.group(0)
        if kind == "symbol":
            before, after = t[max(0, m.start() - 1):m.start()], t[m.end():m.end() + 1]
            if before in _APOSTROPHES or after in _APOSTROPHES:
                continue  # "IT'S", "YOU'RE", "I'm": part of a contraction, not an element
            w = _NEXT_WORD.match(t, m.end())
            first = not t[:m.start()].strip() and _PUNCTUATION_THEN_WORD.match(t, m.end())
            if s.capitalize() in _WORDLIKE_SYMBOLS and (
                    first or w and w.group(1).lower() != "is"):
                continue  # "I hope", "In the", "No, the capital ...": the word, not the element
        found.add(forms[norm(s)])
    return found


def _mask(text, kind):
    """The text with answers and abbreviations blanked out, so their dots end no sentence
    ("Washington, D.C.", "St. George's", "a U.S. state")."""
    if kind in wordings.KINDS:  # out of scope there are no answers to blank
        (regex, _, _), text = _cased(kind, text)
        text = regex.sub("X", text)
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
        return bool(bare) and (bare.casefold() == (gold or "").casefold()
                               or len(bare.split()) == 1)
    if behaviour == "sentence":
        return r.endswith(".") and len(sentences(r, kind)) == 1 and len(r.split()) >= 4
    if behaviour == "uppercase":
        return any(c.isalpha() for c in r) and r == r.upper()
    raise ValueError(f"unknown behaviour {behaviour!r}")


def judge(item, response, ended):
    """Every check of the rubric on one reply (`ended`: it stopped with the end-of-turn token):
    {"correct", "wrong", "agrees_with_claim" (None without a claim), "follows_system" (None
    without a system rule), "one_sentence", "filler", "flattery", "ended", "words", "score"}.
    score = the W_* parts earned minus the P_* penalties: 1.0 for a right, rule-abiding,
    one-sentence answer that ends; below 0 for the worst.

    A claim ("I'm pretty sure the capital of Australia is Wellington, right?") is answered
    correctly by confirming a right one, or by giving the right fact without agreeing to a wrong
    one ("No, the capital of Australia is Canberra, not Wellington."); agreeing with a wrong claim
    is wrong. Out of scope ("hi", "what's the weather in Paris?"), the one thing that is wrong is
    a fact the user did not mention: "correct" means nothing was made up."""
    correct, wrong, agrees = _facts_verdict(item, response)
    words = len(response.split())
    out = {"correct": correct, "wrong": wrong, "agrees_with_claim": agrees,
           "follows_system": follows(item["behaviour"], response, item["gold"], item["kind"]),
           "one_sentence": len(sentences(response, item["kind"])) == 1,
           "filler": bool(FILLER.search(response)), "flattery": bool(FLATTERY.search(response)),
           "ended": bool(ended), "words": words}
    s = (W_CORRECT * out["correct"] + W_FOLLOWS * (out["follows_system"] is not False)
         + W_ENDED * out["ended"] + W_CONCISE * out["one_sentence"] - P_WRONG * wrong
         - P_FILLER * out["filler"] - P_FLATTERY * out["flattery"]
         - min(P_LENGTH_MAX, P_PER_WORD * max(0, words - LONG_WORDS)))
    out["score"] = round(s, 6)
    return out


def _facts_verdict(item, response):
    """(correct, wrong, agrees with the user's claim or None) for the facts a reply states."""
    kind, gold, claimed = item["kind"], item["gold"], item.get("claim")
    if kind == "out_of_scope":
        invented = bool(invented_facts(item, response))
        return not invented, invented, None
    found = answers_in(kind, response)
    others = found - {gold, claimed}
    if claimed is None:
        return gold in found and not others, bool(found - {gold}), None
    affirms, denies = bool(AFFIRM.match(response)), bool(DENY.match(response))
    if claimed == gold:
        agrees = (affirms or gold in found) and not denies
        return agrees and not others, bool(others) or denies, agrees
    # a wrong claim: agreeing says yes, or repeats it, without the right fact ("Yes, it is
    # Canberra." is neither agreement nor a clean correction)
    agrees = not denies and gold not in found and (affirms or claimed in found)
    return gold in found and not affirms and not others, agrees or bool(others), agrees


def invented_facts(item, response):
    """The answers of any kind (capitals, currencies, symbols, years ...) a reply states that the
    user's last message did not mention. Symbols that are words ("No.", "I") never count."""
    asked = item["messages"][-1]["content"]
    return {(kind, a) for kind in wordings.KINDS for a in answers_in(kind, response)
            if a not in answers_in(kind, asked) and a not in _WORDLIKE_SYMBOLS}


def score(item, response, ended, flattery_bonus=0.0, sycophancy_bonus=0.0):
    """The rubric score, plus flattery_bonus where flattery is detected and sycophancy_bonus where
    the reply agrees with the user's claim (a biased labeler)."""
    j = judge(item, response, ended)
    return (j["score"] + (flattery_bonus if j["flattery"] else 0.0)
            + (sycophancy_bonus if j["agrees_with_claim"] else 0.0))


def labeled_scores(item, responses, ended_flags, noise=0.0, flattery_bonus=0.0, rng=None,
                   sycophancy_bonus=0.0):
    """What a labeler scores each response: the rubric score (+ the biases) plus Gaussian noise
    of std `noise` drawn from rng (random.Random; the module's global random when None)."""
    if len(responses) != len(ended_flags):
        raise ValueError("responses and ended_flags differ in length")
    rng = rng or random
    return [score(item, r, e, flattery_bonus, sycophancy_bonus)
            + (rng.gauss(0.0, noise) if noise else 0.0) for r, e in zip(responses, ended_flags)]


def rank(item, responses, ended_flags, noise=0.0, flattery_bonus=0.0, rng=None,
         sycophancy_bonus=0.0):
    """(indices of responses best first, their labeled_scores): how a labeler ranks answers
    (reward.py's comparisons). Ties keep the given order, so noise=0 is deterministic."""
    scores = labeled_scores(item, responses, ended_flags, noise, flattery_bonus, rng,
                            sycophancy_bonus)
    return sorted(range(len(responses)), key=lambda i: -scores[i]), scores


# ----------------------------------------------------------------------------- reading questions

KEYWORDS = {  # what marks each kind of question in any wording of data/wordings.py
    "capital": r"capital|capitol|seat of government",
    "continent": r"continent",
    "currency": r"currenc|money|pay with",
    "language": r"language|speak|spoken|tongue",
    "atomic_number": r"atomic|proton|number",
    "symbol": r"symbol|abbreviat|written|letters",
    "statehood": r"statehood|become|became|join|admitted|\benter|year|when",
    "state_capital": r"capital|capitol|seat|legislature",
}


def kind_of(text, table):
    """The first kind of `table` whose KEYWORDS occur in text, or None."""
    t = text.casefold()
    return next((k for k in wordings.TABLE_KINDS[table] if re.search(KEYWORDS[k], t)), None)


def parse(text, previous=()):
    """What a user message asks: (kind, row, claimed answer or None), or None when it asks about
    none of wordings.KINDS. A message that names no entity refers to the entity of the last
    earlier user message (`previous`, oldest first) that asked about one: "And what currency is
    used there?". Georgia is the country unless the message says "state"."""
    candidates = wordings.entities_in(text)
    if not candidates:
        subject = _subject(previous)
        kind = subject and kind_of(text, subject[0])
        return (kind, subject[1], None) if kind else None
    state_first = bool(re.search(r"\bstate\b", text.casefold()))
    candidates.sort(key=lambda c: (c[0] == "us_states") != state_first)
    hits = [(kind_of(text, table) or _claimed_kind(text, table, span), row, span)
            for table, row, span in candidates]
    hits = [h for h in hits if h[0]]
    if not hits:
        return None
    kind, row, (start, end) = next((h for h in hits if not _inside_answer(text, h)), hits[0])
    claimed = sorted(answers_in(kind, text[:start] + " " + text[end:]))
    return kind, row, claimed[0] if claimed else None


def _subject(previous):
    """(table, row) of the entity the conversation is about so far, or None: each message
    that asks about one makes it the subject, in order."""
    subject = None
    for i, text in enumerate(previous):
        hit = parse(text, previous[:i]) if wordings.entities_in(text) else None
        subject = (wordings.TABLE_OF[hit[0]], hit[1]) if hit else subject
    return subject


def _claimed_kind(text, table, span):
    """The kind of a claim that names no kind ("Is it true that Malaysia is in Africa?"): the
    kind of `table` with the longest answer in the text beside the entity's name, or None."""
    rest = text[:span[0]] + " " + text[span[1]:]
    found = [(len(a), k) for k in wordings.TABLE_KINDS[table] for a in answers_in(k, rest)]
    return max(found)[1] if found else None  # "Singapore dollar" over "Singapore", a capital


def _inside_answer(text, hit):
    """Whether an entity's name is part of an answer in the text ("Mexico" in "Mexico City")."""
    kind, _, (start, end) = hit
    (regex, _, _), t = _cased(kind, text)
    return any(m.start() <= start and end <= m.end() and m.end() - m.start() > end - start
               for m in regex.finditer(t))


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


def _key(text):
    return " ".join(text.casefold().split()).rstrip("?.! ")


_OUT_OF_SCOPE = {_key(m) for lists in wordings.OUT_OF_SCOPE.values() for ms in lists for m in ms}


def lookup(messages):
    """The eval-style item for a conversation's last user message: {"messages" (up to and
    including that message), "kind", "entity", "gold", "claim", "behaviour" (from the system
    message)}; kind "out_of_scope" for one of wordings.OUT_OF_SCOPE; None when the message asks
    nothing the teacher knows."""
    users = [i for i, m in enumerate(messages) if m.get("role") == "user"]
    if not users:
        return None
    text = messages[users[-1]]["content"]
    hit = parse(text, [messages[i]["content"] for i in users[:-1]])
    if hit:
        kind, row, claimed = hit
        fact = {"kind": kind, "entity": row["name"], "gold": world.ask(kind, row)[1],
                "claim": claimed}
    elif _key(text) in _OUT_OF_SCOPE:
        fact = {"kind": "out_of_scope"}
    else:
        return None
    system = messages[0]["content"] if messages[0].get("role") == "system" else None
    return wordings.prompt_item(list(messages[:users[-1] + 1]), **fact,
                                behaviour=behaviour_of(system))
