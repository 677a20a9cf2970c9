"""The evaluations several stages share, judged against the bundled world's fact tables.

- evaluate_base: the evidence that a model is a *base* model: a bare question is continued with
  more questions, and a few-shot Q/A prompt gets the right answer (pretrain.py's eval.json).
- evaluate_chat: an instruct model's greedy answers to chat prompts, judged by the teacher
  (data/teacher.py): accuracy, system-prompt adherence, end of turn, length, and where the
  prompts are claims or out of scope, sycophancy and invented facts (every instruct stage);
  evaluate_instruct runs it on each set of instruct_eval_sets(), all about what SFT never saw.
- evaluate_base_on_chat_prompts: the base model on the same requests, as chat and as plain text.
- evaluate_code: function signatures no document contains, continued by a base model (or sent
  to an instruct model as chat): how often the continuation is code (code_shaped).
- knowledge_audit: which held-out facts the base model knows (3-shot), the ceiling for what
  post-training can elicit; every instruct and reward evaluation splits its figures by it.
- evaluate_reward_model: how well a reward model's scores (scoring.py) agree with the teacher's
  (reward.py), on the SFT model's answers to held-out prompts (heldout_answers; reward.py saves
  them, dpo.py scores its implicit reward on the same).
- policy_against_sft: what every policy stage (ppo, dpo, grpo) reports, the policy beside the SFT
  model it started from: evaluate_instruct, and answers sampled as in training (gold score, KL).
"""
import hashlib
import itertools
import json
import os
import re
import sys

import torch
from tqdm import tqdm

from data import chats, code, teacher, world
from ground import UserError, jsonl_rows, read_json, write_json, write_text
from rl import ONE_PROCESS, answer_logprobs, answer_texts, kl_k1, rollout
from scoring import answer_ids, reward_scores


@torch.no_grad()
def evaluate_base(model, tok, device, seed=0, n_zero_shot=100, batch_size=64):
    """The evidence that this is a base model (see README): does a bare question get continued
    with more questions, does a few-shot Q/A prompt get the right answer, and is a function
    signature continued with code (evaluate_code)?"""
    model.eval()
    bos = [tok.eot_id]

    def complete(texts, max_new, temperature):
        out = []
        for i in range(0, len(texts), batch_size):
            prompts = [bos + tok.encode(t) for t in texts[i:i + batch_size]]
            rows = model.generate(prompts, max_new, temperature=temperature, top_k=50,
                                  stop_ids=[tok.eot_id], seed=seed + i, pad_id=tok.pad_id)
            out += [tok.decode([t for t in r if t != tok.eot_id]) for r in rows]
        return out

    def fits(text, new):  # a short context skips the prompts it cannot hold
        return 1 + len(tok.encode(text)) + new <= model.config.block_size

    questions = [q for q in world.zero_shot_questions()[:n_zero_shot] if fits(q + "\n", 24)]
    conts = complete([q + "\n" for q in questions], 24, temperature=1.0)
    result = {"zero_shot_question_rate": (sum(map(world.is_question, conts)) / len(conts)
                                          if conts else None), "zero_shot_n": len(conts),
              "zero_shot_examples": [q + "\n" + c for q, c in zip(questions[:3], conts[:3])]}
    for kind in ("capital", "symbol"):
        items, prompts = world.fewshot_items(kind), []
        for j, (q, _) in enumerate(items):  # 3 fixed examples that are not the question itself
            shots = [items[(j + k * 7 + 1) % len(items)] for k in range(3)]
            prompts.append(world.fewshot_prompt(shots, q))
        keep = [i for i, p in enumerate(prompts) if fits(p, 12)]
        answers = complete([prompts[i] for i in keep], 12, temperature=0)
        hits = [world.fewshot_answer(c) == items[i][1] for i, c in zip(keep, answers)]
        result[f"fewshot_{kind}_accuracy"] = sum(hits) / len(hits) if hits else None
        result[f"fewshot_{kind}_n"] = len(hits)
    result.update(evaluate_code(model, tok))
    model.train()
    return result


# ----------------------------------------------------------------------------- knowledge audit
KNOWLEDGE_FILE = "knowledge.json"  # beside a checkpoint: the audit of the base model it came from


@torch.no_grad()
def knowledge_audit(base, tok, split="heldout", shots=3, batch_size=64):
    """Which facts of a split (chats.facts) the BASE model knows: each asked in the corpus's own
    "Q: ...\nA:" form after `shots` examples of the same kind about training entities (the form
    of evaluate_base's few-shot test), greedy; known = its first line is the gold answer (a
    final period aside: "Brazilian real." knows the currency).
    Returns [{"kind", "entity", "gold", "answer", "known"}] in chats.facts order (facts whose
    prompt does not fit the context are left out).

    What the base model knows is the ceiling for what post-training can elicit: SFT and RLHF
    teach behaviour, so a fact missing here cannot be stated reliably after them."""
    training = base.training
    base.eval()
    examples = {}
    for kind, row, _, _ in chats.facts("train"):
        examples.setdefault(kind, []).append(world.ask(kind, row))
    facts, prompts = [], []
    for j, (kind, row, _, gold) in enumerate(chats.facts(split)):
        pool = examples[kind]  # a fixed, varied choice of examples for each fact
        chosen = [pool[(j * 7 + k * 13) % len(pool)] for k in range(shots)]
        ids = [tok.eot_id] + tok.encode(world.fewshot_prompt(chosen, world.ask(kind, row)[0]))
        if len(ids) + 24 <= base.config.block_size:  # a short context skips what it cannot hold
            facts.append((kind, row["name"], gold))
            prompts.append(ids)
    audit = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        rows = base.generate(batch, 24, temperature=0.0, pad_id=tok.pad_id,  # the longest answer
                             stop_ids=[tok.eot_id])
        for (kind, entity, gold), out in zip(facts[i:i + batch_size], rows):
            said = world.fewshot_answer(tok.decode([t for t in out if t != tok.eot_id]))
            audit.append({"kind": kind, "entity": entity, "gold": gold, "answer": said,
                          "known": said.rstrip(".") == gold.rstrip(".")})
    base.train(training)
    return audit


def audit_summary(audit):
    """How many audited facts the base model knows, overall and per kind."""
    kinds = sorted({f["kind"] for f in audit})
    rate = {kind: [f["known"] for f in audit if f["kind"] == kind] for kind in kinds}
    return {"n": len(audit), "known": sum(f["known"] for f in audit),
            "known_rate": sum(f["known"] for f in audit) / len(audit) if audit else None,
            "known_rate_by_kind": {kind: sum(v) / len(v) for kind, v in rate.items()}}


def write_knowledge(out_dir, audit, source):
    """knowledge.json in a stage's folder: the audit of the base model (`source`) it came from,
    so that the later stages split their figures by the same facts."""
    write_json(os.path.join(out_dir, KNOWLEDGE_FILE), {"base_model": source, "method": (
        "3-shot Q/A, greedy, first line == gold"), **audit_summary(audit), "facts": audit})


def read_known(ckpt_dir):
    """{(kind, entity): known} from a stage folder's knowledge.json, or None without one."""
    path = os.path.join(ckpt_dir, KNOWLEDGE_FILE)
    if not os.path.exists(path):
        return None
    try:
        return known_map(read_json(path)["facts"])
    except (KeyError, TypeError) as e:
        raise UserError(f"{path}: not a knowledge audit ({e})") from None


def known_map(audit):
    """{(kind, entity): known} of a knowledge_audit."""
    return {(f["kind"], f["entity"]): bool(f["known"]) for f in audit}


def carry_knowledge(source_dir, out_dir):
    """read_known(source_dir), its knowledge.json copied into out_dir for the stage after this
    one; None (and a note) where source_dir has none (a model from before the audit existed)."""
    path = os.path.join(source_dir, KNOWLEDGE_FILE)
    if not os.path.exists(path):
        print(f"note: {source_dir} has no {KNOWLEDGE_FILE}: figures are not split by what the "
              "base model knows", file=sys.stderr)
        return None
    known = read_known(source_dir)
    with open(path, encoding="utf-8") as f:
        write_json(os.path.join(out_dir, KNOWLEDGE_FILE), json.load(f))
    return known


def by_knowledge(items, verdicts, known):
    """The teacher's verdicts split by whether the base model knows the item's fact (`known`:
    read_known's map; items about other facts are left out): {"base_knows": {"n", "accuracy",
    "accuracy_<behaviour>"...}, "base_does_not_know": {...}}."""
    out = {}
    for name, want in (("base_knows", True), ("base_does_not_know", False)):
        mine = [(it, v) for it, v in zip(items, verdicts)
                if known.get((it["kind"], it["entity"])) is want]
        group = {"n": len(mine),
                 "accuracy": sum(v["correct"] for _, v in mine) / len(mine) if mine else None}
        for b in sorted({it["behaviour"] for it, _ in mine}):
            correct = [v["correct"] for it, v in mine if it["behaviour"] == b]
            group[f"accuracy_{b}"] = sum(correct) / len(correct)
        out[name] = group
    return out


@torch.no_grad()
def answer(model, tok, prompts, max_new=48, batch_size=64, temperature=0.0, seed=0, desc=None,
           chat=True):
    """Generate from token-id prompts; returns (text, ended with <|end|>, n tokens) per prompt.
    desc: show a progress bar with this label. chat: the prompts are chats, so the text is an
    assistant turn's (Tokenizer.decode_turn); False: plain text, decoded as it is."""
    stops = [tok.special("<|end|>"), tok.eot_id]
    if max(map(len, prompts)) >= model.config.block_size:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no room in the "
                         f"context of {model.config.block_size}")
    out = []
    for i in tqdm(range(0, len(prompts), batch_size), desc=desc, disable=desc is None,
                  unit="batch", dynamic_ncols=True):
        batch = prompts[i:i + batch_size]
        room = model.config.block_size - max(map(len, batch))
        rows = model.generate(batch, min(max_new, room), temperature=temperature, top_k=50,
                              stop_ids=stops, pad_id=tok.pad_id, seed=seed + i)
        for r in rows:
            ended = bool(r) and r[-1] == stops[0]
            body = r[:-1] if r and r[-1] in stops else r
            out.append(((tok.decode_turn if chat else tok.decode)(body), ended, len(body)))
    return out


def sample_answers(policy, tok, items, *, k, temperature, max_new_tokens, seed, desc=None):
    """k answers per chat prompt, [[(text, ended with <|end|>), ...], ...], each answer once: the
    same answer sampled twice is one answer (there is nothing to compare), and an empty one is
    none. Sampled in batched, KV-cached calls of 64 rows, a prompt's k copies side by side."""
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    copies = [p for p in prompts for _ in range(k)]
    rows = answer(policy, tok, copies, max_new_tokens, temperature=temperature, seed=seed,
                  desc=desc)
    return [list(dict.fromkeys((text.strip(), ended) for text, ended, _ in
                               rows[i * k:(i + 1) * k] if text.strip()))
            for i in range(len(items))]


def heldout_answers(policy, tok, *, k, temperature, max_new_tokens, seed):
    """What a reward model is scored on (evaluate_reward_model): the SFT model's k answers to the
    held-out questions and claims (entities never in SFT or in the comparisons), and the
    teacher's verdicts on them (noise 0, no bias): (items, answers, verdicts)."""
    items = chats.eval_prompts("heldout") + chats.claim_prompts("heldout")
    answers = sample_answers(policy, tok, items, k=k, temperature=temperature,
                             max_new_tokens=max_new_tokens, seed=seed, desc="held-out answers")
    return judged_heldout(items, answers)


def judged_heldout(items, answers):
    """(items, answers, the teacher's verdict on every answer)."""
    verdicts = [[teacher.judge(it, text, ended) for text, ended in options]
                for it, options in zip(items, answers)]
    return items, answers, verdicts


HELDOUT_ANSWERS_FILE = "heldout_answers.jsonl"  # in a reward run's folder


def write_heldout(path, heldout):
    """The held-out answers as JSONL, one prompt a line: {"item", "answers": [[text, ended]]}
    (reward.py writes them beside its comparisons; dpo.py scores its implicit reward on them)."""
    items, answers, _ = heldout
    write_text(path, "".join(json.dumps({"item": it, "answers": options}) + "\n"
                             for it, options in zip(items, answers)))


def read_heldout(path):
    """write_heldout's file, judged again: (items, answers, verdicts)."""
    rows = [row for _, row in jsonl_rows(path)]
    return judged_heldout([row["item"] for row in rows],
                          [[tuple(option) for option in row["answers"]] for row in rows])


def evaluate_chat(model, tok, items, examples=3, known=None):
    """Judge the model's answers to chat prompts (greedy) with the teacher. Used for every
    instruct stage: accuracy, end-of-turn rate, length, adherence per system behaviour, and the
    rates of _claim_and_scope_rates where the prompts are claims or out of scope. known
    (read_known's map): accuracy also split by whether the base model knows the fact."""
    model.eval()
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    results = answer(model, tok, prompts)
    verdicts = [teacher.judge(it, text, ended) for it, (text, ended, _) in zip(items, results)]
    r = {"n": len(items),
         "accuracy": sum(v["correct"] for v in verdicts) / len(items),
         "end_of_turn_rate": sum(v["ended"] for v in verdicts) / len(items),
         "mean_length_tokens": sum(n for _, _, n in results) / len(items),
         "mean_score": sum(v["score"] for v in verdicts) / len(items),
         "filler_rate": sum(v["filler"] for v in verdicts) / len(items),
         "flattery_rate": sum(v["flattery"] for v in verdicts) / len(items)}
    for b in sorted({it["behaviour"] for it in items}):
        mine = [v for it, v in zip(items, verdicts) if it["behaviour"] == b]
        r[f"accuracy_{b}"] = sum(v["correct"] for v in mine) / len(mine)
        if b != "none":
            r[f"adherence_{b}"] = sum(v["follows_system"] for v in mine) / len(mine)
    r.update(_claim_and_scope_rates(items, verdicts))
    if known and any(it["entity"] for it in items):
        r.update(by_knowledge(items, verdicts, known))
    r["examples"] = [{"prompt": it["messages"], "response": text, "ended": ended}
                     for it, (text, ended, _) in list(zip(items, results))[:examples]]
    model.train()
    return r


def gold_stats(items, texts, ended):
    """The teacher on sampled answers (PPO's rollouts, its sampled evaluation): mean gold score,
    accuracy, filler and flattery rates, and the rates of _claim_and_scope_rates. Prompts the
    teacher cannot judge (kind None: a user's own) are left out; none judged: {}."""
    judged = [(it, text, e) for it, text, e in zip(items, texts, ended) if it["kind"]]
    if not judged:
        return {}
    verdicts = [teacher.judge(*row) for row in judged]
    stats = {name: sum(v[key] for v in verdicts) / len(verdicts) for name, key in (
        ("gold_score", "score"), ("accuracy", "correct"), ("filler_rate", "filler"),
        ("flattery_rate", "flattery"))}
    return {**stats, **_claim_and_scope_rates([it for it, _, _ in judged], verdicts)}


def _claim_and_scope_rates(items, verdicts):
    """Where items are claims: how often the answer agrees with a wrong claim (sycophancy) and
    confirms a right one; where they are out of scope: how often it states an invented fact."""
    r = {}
    for name, keep in (("agrees_with_wrong_claim_rate", lambda it: it["claim"] != it["gold"]),
                       ("confirms_right_claim_rate", lambda it: it["claim"] == it["gold"])):
        mine = [v for it, v in zip(items, verdicts) if it.get("claim") is not None and keep(it)]
        if mine:
            r[name] = sum(v["agrees_with_claim"] for v in mine) / len(mine)
    scope = [v for it, v in zip(items, verdicts) if it["kind"] == "out_of_scope"]
    if scope:
        r["invented_fact_rate"] = sum(v["wrong"] for v in scope) / len(scope)
    return r


def instruct_eval_sets():
    """The judged prompt sets every instruct stage reports, all about what SFT never trained on:
    held-out entities in trained and in never-used wordings (each fact under every system-prompt
    behaviour), the latter also typed all in lower or upper case, the entity's name included;
    follow-ups that refer to the previous turn, claims to confirm or correct, and requests out
    of scope in new wordings, each typed four ways."""
    every = len(chats.BEHAVIOURS) * len(chats.facts("heldout"))
    return {"heldout": chats.eval_prompts("heldout", n=every),
            "heldout_new_wordings": chats.eval_prompts("heldout", n=every, wording="heldout"),
            "heldout_recased": chats.eval_prompts("heldout", n=every, wording="heldout",
                                                  casings=("lower", "upper")),
            "heldout_follow_ups": chats.follow_up_prompts("heldout"),
            "heldout_claims": chats.claim_prompts("heldout"),
            "out_of_scope_new_wordings": chats.out_of_scope_prompts("heldout", variants=4)}


def evaluate_instruct(model, tok, known=None):
    """evaluate_chat on each of instruct_eval_sets() (known: split by the knowledge audit)."""
    return {name: evaluate_chat(model, tok, items, known=known)
            for name, items in instruct_eval_sets().items()}


def weights_digest(model):
    """sha256 over a model's parameter names, dtypes and bytes: which weights an eval.json judged
    (sft.py writes it, so that the stages after SFT can tell its figures are the reference's)."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return digest.hexdigest()


def eval_sets_digest(sets):
    """sha256 of instruct_eval_sets()'s sets: which prompts (and answer keys) an eval.json
    judged."""
    return hashlib.sha256(json.dumps(sets, sort_keys=True).encode()).hexdigest()


def sft_greedy_figures(sft_dir, reference, device):
    """evaluate_instruct's figures from the SFT run's own eval.json when it judged exactly these
    weights, on these prompts, on this kind of device (greedy answers are a function of those
    three), else None. Saves every policy stage a minute of evaluating the same SFT model
    again."""
    if sft_dir is None:
        return None
    folder = os.path.dirname(sft_dir) if os.path.isfile(sft_dir) else sft_dir  # ckpt.pt named
    path = os.path.join(folder, "eval.json")
    try:
        judged = read_json(path)
    except UserError:
        return None  # no such file, or a damaged one: evaluate instead
    sets = instruct_eval_sets()
    if (judged.get("weights_sha256") != weights_digest(reference) or judged.get("device") != device
            or judged.get("eval_sets_sha256") != eval_sets_digest(sets)
            or any(name not in judged for name in sets)):
        return None
    return {name: judged[name] for name in sets}


def policy_against_sft(name, policy, reference, tok, known, *, temperature, max_new_tokens, seed,
                       sft_dir=None, proc=ONE_PROCESS):
    """What every policy stage (ppo, dpo, grpo) reports against the SFT model it started from:
    {"sampled": {"sft": ..., name: ...}, "sft": evaluate_instruct, name: evaluate_instruct,
    "sft_greedy_from": where "sft" came from}. sft_dir: the SFT run's folder, whose eval.json
    stands in for "sft" (sft_greedy_figures)."""
    runs = {"sft": reference, name: policy}
    sampled = {run: sampled_heldout(model, reference, tok, temperature=temperature,
                                    max_new_tokens=max_new_tokens, seed=seed, proc=proc)
               for run, model in runs.items()}
    copied = sft_greedy_figures(sft_dir, reference, proc.device)
    return {"sampled": sampled, "sft": copied or evaluate_instruct(reference, tok, known),
            "sft_greedy_from": "the SFT run's eval.json" if copied else "measured here",
            name: evaluate_instruct(policy, tok, known)}


@torch.no_grad()
def sampled_heldout(model, reference, tok, *, temperature, max_new_tokens, seed, every=1,
                    proc=ONE_PROCESS):
    """The model's sampled answers (as a policy stage samples) to the held-out questions and
    claims (every `every`-th of them): gold_stats, end-of-turn rate, length, and
    KL(model || SFT), summed over answer tokens."""
    items = (chats.eval_prompts("heldout") + chats.claim_prompts("heldout"))[::every]
    model.eval()
    batch = rollout(model, tok, items, max_new_tokens=max_new_tokens, temperature=temperature,
                    seed=seed, proc=proc)
    mask = batch["mask"]
    kl = (kl_k1(answer_logprobs(model, batch, temperature),
                answer_logprobs(reference, batch, temperature)) * mask).sum(1)
    return {**gold_stats(items, answer_texts(tok, batch), batch["ended"].tolist()),
            "end_of_turn_rate": batch["ended"].float().mean().item(),
            "mean_length_tokens": mask.sum(1).mean().item(), "kl_to_sft": kl.mean().item()}


def evaluate_base_on_chat_prompts(model, tok, items):
    """The base model on the same requests: rendered as chat (it was never taught the format)
    and as plain text (it continues the pattern: more questions)."""
    r = {f"chat_{k}": v for k, v in evaluate_chat(model, tok, items, examples=0).items()
         if k in ("accuracy", "end_of_turn_rate")}
    plain = [chats.request_ids(tok, it["messages"], chat=False) for it in items]
    texts = [t for t, _, _ in answer(model, tok, plain, max_new=24, temperature=1.0, chat=False)]
    verdicts = [teacher.judge(it, t, False) for it, t in zip(items, texts)]
    r["plain_question_rate"] = sum(map(world.is_question, texts)) / len(texts)
    r["plain_accuracy"] = sum(v["correct"] for v in verdicts) / len(texts)
    for b in sorted({it["behaviour"] for it in items} - {"none"}):
        follows = [v["follows_system"] for it, v in zip(items, verdicts) if it["behaviour"] == b]
        r[f"plain_adherence_{b}"] = sum(follows) / len(follows)
    r["plain_examples"] = [chats.plain_prompt(it["messages"]) + t for it, t in
                           list(zip(items, texts))[:2]]
    return r


def check_chat_eval_fits(tok, block_size):
    """Fail before training, not after it, if the held-out chat prompts (as chat or as plain
    text) cannot fit the context."""
    items = [it for group in instruct_eval_sets().values() for it in group]
    longest = max(len(chats.request_ids(tok, it["messages"], chat))
                  for it in items for chat in (True, False))
    if longest >= block_size:
        raise UserError(f"the evaluation prompts need a context of more than {longest} tokens; "
                        f"the model's is {block_size} (--no-behaviour-eval skips them)")


# ----------------------------------------------------------------------------- code
_PROSE = re.compile(r"^[A-Za-z][A-Za-z',-]*( [A-Za-z0-9',-]+){3,}[.?!]$")  # a sentence, no code


def function_body(language, completion, ended):
    """The body a completion gives a signature: JavaScript up to the brace that closes it;
    Python up to the first line back at column 0, or all of it if the document `ended` there.
    None if the function never ends."""
    if language == "javascript":
        depth = 1
        for i, ch in enumerate(completion):
            depth += (ch == "{") - (ch == "}")
            if depth == 0:
                return completion[:i]
        return None
    lines = completion.split("\n")
    for i, line in enumerate(lines[1:], 1):
        if line.strip() and not line[0].isspace():
            return "\n".join(lines[:i])
    return completion if ended else None


def code_shaped(language, completion, ended=False):
    """Is this continuation of a function signature code? It ends the function (balanced braces,
    or a line back at column 0), every line of its body is indented (Python: by a multiple of 4
    spaces), it returns something, and no line is an English sentence outside a comment."""
    body = function_body(language, completion, ended)
    lines = [line for line in (body or "").split("\n") if line.strip()]
    if not lines:
        return False
    width = 4 if language == "python" else 2
    indented = all(len(line) - len(line.lstrip(" ")) >= width and
                   (language != "python" or (len(line) - len(line.lstrip(" "))) % 4 == 0)
                   for line in lines)
    statements = [line.strip() for line in lines
                  if not line.strip().startswith(("//", "#", "*", "/*"))]
    return (indented and any(re.match(r"return\b", line) for line in statements)
            and not any(_PROSE.match(line) for line in statements))


@torch.no_grad()
def evaluate_code(model, tok, chat=False, max_new=80, examples=2):
    """data/code.EVAL_SIGNATURES, which no document of the world contains, each continued greedily
    (a base model: as plain text; chat=True: sent as a user message, for an instruct model):
    the share of continuations that are code (code_shaped), per language. As text, a signature
    ends with its newline: the tokenizer writes " {\n" and "):\n" as one token each, so a
    signature cut before the newline ends on tokens the corpus never puts after a signature
    (README, "Code completion"; sample.py --heal)."""
    training, result = model.training, {}
    model.eval()
    end = tok.special("<|end|>")
    for language, signatures in code.EVAL_SIGNATURES.items():
        if chat:
            prompts = [tok.render_chat([{"role": "user", "content": s}], for_completion=True)[0]
                       for s in signatures]
        else:
            prompts = [[tok.eot_id] + tok.encode(s + "\n") for s in signatures]
        room = model.config.block_size - max(map(len, prompts))
        rows = model.generate(prompts, min(max_new, room), temperature=0.0, pad_id=tok.pad_id,
                              stop_ids=[tok.eot_id, end])
        decode = tok.decode_turn if chat else tok.decode
        texts = [decode([t for t in r if t not in (tok.eot_id, end)]) for r in rows]
        ended = [bool(r) and r[-1] in (tok.eot_id, end) for r in rows]
        shaped = [code_shaped(language, t if chat else "\n" + t, e) for t, e in zip(texts, ended)]
        result[f"code_shaped_rate_{language}"] = sum(shaped) / len(shaped)
        result[f"code_examples_{language}"] = [
            {"prompt": s if chat else s + "\n", "continuation": t}
            for s, t in zip(signatures[:examples], texts[:examples])]
    result["code_n"] = sum(map(len, code.EVAL_SIGNATURES.values()))
    model.train(training)
    return result


# ----------------------------------------------------------------------------- reward model
def spearman(x, y):
    """Spearman's rank correlation of two lists of numbers (tied values share their mean rank)."""
    def ranks(values):
        order = sorted(range(len(values)), key=values.__getitem__)
        out, i = [0.0] * len(values), 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
                j += 1
            for t in range(i, j + 1):
                out[order[t]] = (i + j) / 2
            i = j + 1
        return torch.tensor(out, dtype=torch.float64)
    rx, ry = ranks(x), ranks(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    if rx.norm() == 0 or ry.norm() == 0:
        return None  # a constant list has no ranking
    return float((rx * ry).sum() / (rx.norm() * ry.norm()))


DIFFERENCES = {  # what separates two answers the teacher ranks apart
    "fact": lambda verdict: verdict["correct"],
    "ended": lambda verdict: verdict["ended"],
    "filler_or_flattery": lambda verdict: verdict["filler"] or verdict["flattery"],
    "system_rule": lambda verdict: verdict["follows_system"],
}


def evaluate_reward_model(model, tok, heldout, device, offset=0.0, examples=2, known=None):
    """A reward model against the teacher. heldout: (prompt items, answers, teacher verdicts).
    Pairwise accuracy on the pairs the teacher scores apart, overall and by what separates the
    two answers; Spearman's rank correlation of its scores with the teacher's, every answer.
    known (read_known's map): the fact pairs also split by whether the base model knows it."""
    items, answers, verdicts = heldout
    seqs = [answer_ids(tok, it["messages"], text, ended)
            for it, options in zip(items, answers) for text, ended in options]
    flat = reward_scores(model, seqs, tok.pad_id, device, offset)
    ends = list(itertools.accumulate(len(options) for options in answers))
    scores = [flat[end - len(options):end] for end, options in zip(ends, answers)]
    hits = {name: [] for name in ("all", *DIFFERENCES)}
    by_known = {"base_knows": [], "base_does_not_know": []}
    for item, mine, judged in zip(items, scores, verdicts):
        knows = (known or {}).get((item["kind"], item["entity"]))
        for i in range(len(mine)):
            for j in range(len(mine)):
                if judged[i]["score"] <= judged[j]["score"]:
                    continue  # i is the teacher's better answer; equal scores are a tie
                right = mine[i] > mine[j]
                hits["all"].append(right)
                for name, kind in DIFFERENCES.items():
                    a, b = kind(judged[i]), kind(judged[j])
                    if a is not None and b is not None and bool(a) != bool(b):
                        hits[name].append(right)
                        if name == "fact" and knows is not None:
                            by_known["base_knows" if knows else "base_does_not_know"].append(
                                right)
    result = {"prompts": len(items), "answers": len(flat), "pairs": len(hits["all"]),
              "accuracy": sum(hits["all"]) / len(hits["all"]) if hits["all"] else None,
              "by_difference": {name: {"pairs": len(h), "accuracy": sum(h) / len(h) if h else None}
                                for name, h in hits.items() if name != "all"},
              "spearman": spearman(flat, [v["score"] for judged in verdicts for v in judged])}
    if known:
        result["fact_pairs_by_knowledge"] = {
            name: {"pairs": len(h), "accuracy": sum(h) / len(h) if h else None}
            for name, h in by_known.items()}
    result["examples"] = [{"prompt": it["messages"], "answers": [
        {"text": text, "ended": ended, "teacher": v["score"], "reward": round(r, 4)}
        for (text, ended), v, r in zip(options, judged, mine)]}
        for it, options, judged, mine in list(zip(items, answers, verdicts, scores))[:examples]]
    return result
