"""The comparisons file of the reward stage: one JSON object a line, in the K-way form every
labeler writes and a user can inspect, edit or relabel:

    {"messages": [...the prompt...], "responses": ["...", "...", "..."], "ranking": [2, 0, 1],
     "ended": [true, true, false], "scores": [...], "id": 0, "kind": ..., "entity": ...}

ranking lists response indices best first; ended says which answers stopped with <|end|> (the
rest were cut at the length limit); scores, when present, are the teacher's (equal scores are a
tie; delete them when you relabel by hand). A person's skip is a line {"id": i, "skipped":
true}. A user's file may also hold pairwise rows as in TRL's preference datasets, {"prompt" or
"messages", "chosen", "rejected"}. Also here: the terminal labeler, a person ranking answers,
and a user's own prompts for PPO (read_prompts).
"""
import hashlib
import json
import os
import textwrap

from data import teacher
from data.tokenizer import check_chat
from data.wordings import prompt_item
from ground import UserError, jsonl_rows


def comparison(i, item, options, ranking, scores=None):
    """One K-way row, the form every labeler writes and --comparisons reads."""
    row = {"id": i, "messages": item["messages"], "responses": [t for t, _ in options],
           "ended": [e for _, e in options], "ranking": ranking}
    if scores is not None:
        row["scores"] = [round(x, 6) for x in scores]
    return {**row, **{k: item[k] for k in ("kind", "entity", "gold", "claim", "behaviour")
                      if k in item}}


def pairs_of(row):
    """(better, worse) response indices of a ranked row, every pair of its ranking (C(K, 2) of
    K answers); and how many pairs are ties (answers the labeler scored equally), which teach
    nothing."""
    order = row["ranking"]
    scores = row.get("scores")
    pairs = []
    ties = 0
    for position, better in enumerate(order):
        for worse in order[position + 1:]:
            if scores and scores[better] == scores[worse]:
                ties += 1
            else:
                pairs.append((better, worse))
    return pairs, ties


def human_rankings(items, answers, path, ask=input):
    """A person ranks each prompt's answers in the terminal (or skips it). Each ranking or skip
    is appended to `path` at once (flushed to disk), so quitting, Ctrl-C or a crash loses
    nothing, and the next start resumes at the first prompt not yet ranked or skipped. Returns
    True when every prompt is."""
    done = {row["id"] for _, row in jsonl_rows(path)} if os.path.exists(path) else set()
    todo = [i for i in range(len(items)) if i not in done]
    for n, i in enumerate(todo):
        letters = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"[:len(answers[i])]
        show_prompt(items[i], answers[i], letters, f"{len(items) - len(todo) + n + 1} of "
                                                   f"{len(items)}")
        while True:
            try:
                reply = ask(f"rank best first ({letters}), s = skip, q = quit> ").strip().upper()
            except (EOFError, KeyboardInterrupt):  # Ctrl-D, Ctrl-C: as q, everything is saved
                reply = "Q"
            if reply in ("S", "Q") or sorted(reply) == list(letters):
                break
            print(f"  type each of {', '.join(letters)} once, best first (for example "
                  f"{letters[1]}{letters[0]}{letters[2:]}); s skips this prompt, q quits")
        if reply == "Q":
            print()
            break
        row = {"id": i, "skipped": True} if reply == "S" else comparison(
            i, items[i], answers[i], [letters.index(c) for c in reply])
        with open(path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
        done.add(i)
    return all(i in done for i in range(len(items)))


def show_prompt(item, options, letters, progress):
    print(f"\n=== prompt {progress}")
    for m in item["messages"]:
        print(textwrap.fill(m["content"], 96, initial_indent=f"{m['role']}: ",
                            subsequent_indent="  "))
    for letter, (text, ended) in zip(letters, options):
        cut = "" if ended else "  [cut: no end of turn]"
        print(textwrap.fill(text or "(empty)", 96, initial_indent=f"  {letter}) ",
                            subsequent_indent="     ") + cut)


def read_comparisons(path, allow_empty=False):
    """Rows of a user's file, checked: K-way {"messages", "responses", "ranking"} (indices into
    responses, best first; optional "ended") or pairwise {"prompt" or "messages", "chosen",
    "rejected"} as in TRL's preference datasets. A bad row: `file:line: field: problem`."""
    rows = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict):
            raise UserError(f"{where}: expected a JSON object")
        if row.get("skipped"):
            continue  # a prompt the person skipped
        if "chosen" in row or "rejected" in row:
            row = pairwise_to_kway(row, where)
        for field in ("messages", "responses", "ranking"):
            if field not in row:
                raise UserError(f"{where}: {field}: missing (a K-way row has messages, "
                                "responses and ranking; a pairwise one prompt, chosen, rejected)")
        check_kway(row, where)
        rows.append({**row, "id": len(rows), "where": where,
                     "ended": row.get("ended", [True] * len(row["responses"]))})
    if not rows and not allow_empty:
        raise UserError(f"{path}: no comparisons")
    return rows


def rows_checksum(rows, *how):
    """A checksum of read_comparisons' rows (their content, not where they were read) and of how
    a run uses them (how: its split, seed, batch size): a resumed run must see the same."""
    content = [{k: v for k, v in row.items() if k not in ("id", "where")} for row in rows]
    return hashlib.sha256(json.dumps([content, *how], sort_keys=True).encode()).hexdigest()


def pairwise_to_kway(row, where):
    def text(field):  # a string, or TRL's conversational form [{"role": "assistant", ...}]
        value = row.get(field)
        if isinstance(value, list) and len(value) == 1 and isinstance(value[0], dict):
            value = value[0].get("content")
        if not isinstance(value, str):
            raise UserError(f"{where}: {field}: missing, or not a string")
        return value
    prompt = row.get("messages", row.get("prompt"))
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    return {"messages": messages, "responses": [text("chosen"), text("rejected")],
            "ranking": [0, 1]}


def check_kway(row, where):
    try:
        check_chat(row["messages"], for_completion=True)
    except ValueError as e:
        raise UserError(f"{where}: messages: {e} (the prompt: ending with a user turn)") from None
    responses, ranking = row["responses"], row["ranking"]
    if not isinstance(responses, list) or len(responses) < 2:
        raise UserError(f"{where}: responses: a list of at least 2 answers to compare")
    if not all(isinstance(r, str) and r.strip() for r in responses):
        raise UserError(f"{where}: responses: every answer must be a non-empty string")
    ended = row.get("ended", [True] * len(responses))
    if not (isinstance(ended, list) and len(ended) == len(responses)
            and all(isinstance(e, bool) for e in ended)):
        raise UserError(f"{where}: ended: one true/false per response")
    if len(set(zip(responses, ended))) < len(responses):
        raise UserError(f"{where}: responses: the same answer twice (nothing to compare)")
    if not isinstance(ranking, list) or not all(type(r) is int for r in ranking) or \
            sorted(ranking) != list(range(len(responses))):
        raise UserError(f"{where}: ranking: must list each response index 0..{len(responses) - 1}"
                        f" once, best first, got {ranking}")
    scores = row.get("scores")
    if scores is not None and not (
            isinstance(scores, list) and len(scores) == len(responses)
            and all(type(x) in (int, float) for x in scores)
            and all(scores[a] >= scores[b] for a, b in zip(ranking, ranking[1:]))):
        raise UserError(f"{where}: scores: one number per response, not increasing along the "
                        "ranking (after relabelling by hand, delete the teacher's scores)")


def check_labeler(path, labeler):
    """Never overwrite a person's rankings with the teacher's, nor go on from the teacher's
    rankings as if a person had made them (a person's rows carry no scores)."""
    if not os.path.exists(path):
        return
    rows = [row for _, row in jsonl_rows(path) if not row.get("skipped")]
    by = "the teacher" if any("scores" in row for row in rows) else "a person"
    if rows and (by == "a person") != (labeler == "human"):
        raise UserError(f"{path} holds rankings by {by}; --labeler {labeler} would "
                        f"{'overwrite' if labeler == 'teacher' else 'mix with'} them: choose "
                        "another --out-dir (or move the file)")


def read_prompts(path):
    """A user's prompts for PPO, checked: one JSON object a line, {"messages": [... ending with a
    user turn]} or {"prompt": "text"} (TRL's prompt-only form). Each becomes the teacher's item
    where the teacher knows what it asks (teacher.lookup), else one it cannot judge (kind None).
    A bad row: `file:line: problem`."""
    items = []
    for where, row in jsonl_rows(path):
        if not isinstance(row, dict) or ("messages" in row) == ("prompt" in row):
            raise UserError(f'{where}: expected {{"messages": [...]}} or {{"prompt": "..."}}')
        messages = (row["messages"] if "messages" in row
                    else [{"role": "user", "content": row["prompt"]}])
        try:
            check_chat(messages, for_completion=True)
        except ValueError as e:
            raise UserError(f"{where}: messages: {e}") from None
        system = messages[0]["content"] if messages[0]["role"] == "system" else None
        items.append(teacher.lookup(messages) or prompt_item(
            messages, behaviour=teacher.behaviour_of(system)))
    if not items:
        raise UserError(f"{path}: no prompts")
    return items
