"""Experiment: the "domain expert" route. To make a model speak a language nobody else speaks (a
private query language), should you fine-tune the base model or the instruct model?

    python -m experiments.domain_expert      # after ./run.sh: out/base, out/sft, out/ppo
    python -m experiments.domain_expert --preset tiny --base out/tiny/base --sft out/tiny/sft \\
        --ppo out/tiny/ppo --out-dir out/tiny/experiments/domain_expert   # a smoke test

The language is data/query.py's: `countries | continent = "Europe" | top 3 by population | pick
name`. Each start (the base, SFT and PPO models) is fine-tuned on the same (question, query)
pairs in plain text, "Q: <question>\\nQuery: <query>\\n" with the loss on the query and its
newline: the same steps, learning rate, batches and seed. At each of the evaluation steps it
answers the held-out questions (held-out entities, and question shapes the training pairs never
show) greedily, scored three ways:
  exact      the query exactly as data/query.py writes it (spaces aside)
  execution  the query runs and returns the right answer (any correct query counts)
  chatty     the answer has an assistant's habits: it is not a query at all (a sentence, a
             refusal), or it holds filler or flattery, or it ends a turn with <|end|>
The fourth start is the "wrapper": the instruct model with no fine-tuning, asked in chat with a
system prompt that explains the language (data/query.SPEC, or only its examples where the
context is too short for it; --spec FILE to give your own), its <|end|> not counted as chatty.
Writes curves.csv (start, step, split, exact, execution, chatty), curves.png, table.md and
summary.json under --out-dir.
"""
import argparse
import csv
import json
import os

import torch

from common import UserError, die, load_checkpoint, pick_device, positive, write_json
from data import query, teacher, world

PRESETS = {  # fine-tuning steps, evaluation steps, batch size, held-out questions per split
    "tiny": dict(steps=4, eval_at=[0, 2, 4], batch_size=8, heldout=8),
    "cpu": dict(steps=300, eval_at=[0, 25, 50, 100, 200, 300], batch_size=32, heldout=150),
}
MAX_NEW = 40  # tokens of an answer: the longest query is about 30


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", default="out/base")
    p.add_argument("--sft", default="out/sft")
    p.add_argument("--ppo", default="out/ppo", help="left out when it does not exist")
    p.add_argument("--out-dir", default="out/experiments/domain_expert")
    p.add_argument("--pairs", metavar="FILE", help="training pairs instead of data/query.py's: "
                   'JSONL of {"question": ..., "query": ...}')
    p.add_argument("--spec", metavar="FILE", help="the wrapper's system prompt instead of "
                   "data/query.SPEC; its lines after 'Examples:' must be queries")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--lr", type=positive(float), default=3e-4, help="every start's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    a = parse_args(argv)
    try:
        run(a)
    except UserError as e:
        die(str(e))


def read_pairs(path):
    """(question, query) rows of a JSONL file; a bad row is named with its line."""
    rows = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                question, text = row["question"], row["query"]
                if not isinstance(question, str) or not question.strip():
                    raise ValueError("question: expected a non-empty string")
                query.parse(text)
            except query.QueryError as e:
                raise UserError(f"{path}:{n}: query: {e}") from None
            except (ValueError, KeyError, TypeError) as e:
                raise UserError(f"{path}:{n}: expected {{\"question\": ..., \"query\": ...}} "
                                f"({e})") from None
            rows.append((question, text))
    if not rows:
        raise UserError(f"{path}: no pairs")
    return rows


def read_spec(path):
    """A system prompt whose lines after 'Examples:' all parse as queries."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if "Examples:" not in text:
        raise UserError(f"{path}: no 'Examples:' line (the wrapper is shown examples)")
    first = text[:text.index("Examples:")].count("\n") + 2
    for n, line in enumerate(text.split("Examples:", 1)[1].splitlines()[1:], first):
        if line.strip():
            try:
                query.parse(line)
            except query.QueryError as e:
                raise UserError(f"{path}:{n}: {e}") from None
    return text


def load_starts(a, device):
    """{name: (model, tokenizer)} of the starts that exist; one tokenizer for all."""
    starts = {}
    for name, path, stages in (("base", a.base, ["base"]), ("sft", a.sft, ["sft"]),
                               ("ppo", a.ppo, ["ppo"])):
        if name == "ppo" and not os.path.exists(path):
            print(f"note: no PPO model at {path}: compared without it")
            continue
        model, tok, _ = load_checkpoint(path, stages, device, f"--{name}")
        first = next(iter(starts.items()), None)
        if first and tok.checksum != first[1][1].checksum:
            raise UserError(f"--{name} {path} has another tokenizer than --{first[0]}: the "
                            "starts must come from one pipeline")
        starts[name] = (model, tok)
    return starts


def encode_pairs(tok, pairs, block_size):
    """Each pair as (ids, targets): "Q: ...\\nQuery: " then the query and a newline, which is
    where the loss is taken (-1 elsewhere)."""
    out = []
    for question, text in pairs:
        prompt = [tok.eot_id] + tok.encode(f"Q: {question}\nQuery:")
        answer = tok.encode(f" {text}\n")
        ids = (prompt + answer)[:block_size + 1]
        targets = [-1] * (len(prompt) - 1) + answer
        out.append((ids[:-1], targets[:len(ids) - 1]))
    return out


def batches(examples, a, settings, pad_id, device):
    """settings["steps"] batches, drawn by a generator seeded with --seed: the same for all."""
    gen = torch.Generator().manual_seed(a.seed)
    for _ in range(settings["steps"]):
        pick = torch.randint(len(examples), (settings["batch_size"],), generator=gen).tolist()
        rows = [examples[i] for i in pick]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in rows], device=device)
        targets = torch.tensor([y + [-1] * (width - len(y)) for _, y in rows], device=device)
        yield ids, targets


def is_chatty(text, turn_ended):
    """An assistant's habits where a query is wanted."""
    first = text.strip().split(" ", 1)[0]
    return (first not in query.FIELDS or bool(teacher.FILLER.search(text.lower()))
            or bool(teacher.FLATTERY.search(text.lower())) or turn_ended)


def score(answers, items, facts, count_end=True):
    """exact, execution and chatty rates of (text, turn ended) answers to (question, query,
    answer) items."""
    exact = execution = chatty = 0
    for (text, turn_ended), (_, gold, gold_answer) in zip(answers, items):
        line = text.strip().split("\n")[0]
        exact += " ".join(line.split()) == gold
        try:
            execution += query.execute(line, facts) == gold_answer
        except query.QueryError:
            pass
        chatty += is_chatty(line, turn_ended and count_end)
    n = len(items)
    return {"exact": exact / n, "execution": execution / n, "chatty": chatty / n}


@torch.no_grad()
def answers(model, tok, prompts, stop_ids):
    """Greedy answers as (text, ended its turn with <|end|>)."""
    model.eval()
    room = model.config.block_size - max(map(len, prompts))
    rows = model.generate(prompts, min(MAX_NEW, room), temperature=0.0, stop_ids=stop_ids,
                          pad_id=tok.pad_id)
    model.train()
    end = tok.special("<|end|>")
    return [(tok.decode([t for t in r if t not in stop_ids]), bool(r) and r[-1] == end)
            for r in rows]


def evaluate(model, tok, heldout, facts, step):
    """The held-out scores of a model prompted as in fine-tuning; an answer ends at its line."""
    stops = [tok.eot_id, tok.special("<|end|>"), *tok.encode("\n")[-1:]]
    out = []
    for split, items in heldout.items():
        prompts = [[tok.eot_id] + tok.encode(f"Q: {q}\nQuery:") for q, _, _ in items]
        got = answers(model, tok, prompts, stops)
        out.append({"step": step, "split": split, **score(got, items, facts)})
    return out


def fine_tune(name, model, tok, examples, heldout, facts, a, settings, device):
    """The curve of one start: its held-out scores at each evaluation step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=a.lr, weight_decay=0.0)
    curve = evaluate(model, tok, heldout, facts, 0) if 0 in settings["eval_at"] else []
    for step, (ids, targets) in enumerate(batches(examples, a, settings, tok.pad_id, device), 1):
        _, loss = model(ids, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in settings["eval_at"]:
            curve += evaluate(model, tok, heldout, facts, step)
            print(f"{name} step {step}: loss {loss.item():.3f}, " + ", ".join(
                f"{r['split']} execution {r['execution']:.1%}" for r in curve[-len(heldout):]),
                flush=True)
    return [{"start": name, **row} for row in curve]


def wrapper_system(a, tok, heldout, block_size):
    """The wrapper's system prompt: --spec, else the whole SPEC, else fewer and fewer of its
    examples, the first that leaves an answer room for MAX_NEW tokens in the context (None if
    none does)."""
    if a.spec:
        choices = [read_spec(a.spec)]
    else:
        examples = query.SPEC.split("Examples:\n")[1].splitlines()
        choices = [query.SPEC] + ["Reply with the query only. Examples:\n" + "\n".join(examples[:k])
                                  for k in range(len(examples), 0, -1)]
    questions = [q for items in heldout.values() for q, _, _ in items]
    for system in choices:
        longest = max(len(chat_prompt(tok, system, q)) for q in questions)
        if longest + MAX_NEW <= block_size:
            return system
    print(f"note: the wrapper's system prompt leaves no room for a question and {MAX_NEW} tokens "
          f"of answer in a context of {block_size}: compared without it")
    return None


def chat_prompt(tok, system, question):
    return tok.render_chat([{"role": "system", "content": system},
                            {"role": "user", "content": question}], for_completion=True)[0]


def wrapper(model, tok, system, heldout, facts, eval_at):
    """The instruct model with no fine-tuning, asked in chat: the same scores at every step."""
    rows = []
    for split, items in heldout.items():
        prompts = [chat_prompt(tok, system, q) for q, _, _ in items]
        got = answers(model, tok, prompts, [tok.eot_id, tok.special("<|end|>")])
        rows += [{"start": "sft, prompted (wrapper)", "step": step, "split": split,
                  **score(got, items, facts, count_end=False)} for step in eval_at]
    return rows


def run(a):
    settings = PRESETS[a.preset]
    device = pick_device(a.device)
    starts = load_starts(a, device)
    tok = next(iter(starts.values()))[1]
    block_size = min(model.config.block_size for model, _ in starts.values())
    facts = world.load_facts()
    pairs = read_pairs(a.pairs) if a.pairs else [(q, t) for q, t, _ in query.query_pairs("train")]
    heldout = {split: query.query_pairs(split)[:settings["heldout"]]
               for split in ("heldout_entities", "heldout_shapes")}
    system = wrapper_system(a, tok, heldout, block_size)
    os.makedirs(a.out_dir, exist_ok=True)
    curves = (wrapper(starts["sft"][0], tok, system, heldout, facts, settings["eval_at"])
              if system else [])
    examples = encode_pairs(tok, pairs, block_size)
    for name, (model, _) in starts.items():  # the wrapper first: this changes the models
        curves += fine_tune(name, model, tok, examples, heldout, facts, a, settings, device)
    write_results(a, settings, curves, system, len(pairs))


def write_results(a, settings, curves, system, n_pairs):
    columns = ["start", "step", "split", "exact", "execution", "chatty"]
    with open(os.path.join(a.out_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(curves)
    last = [r for r in curves if r["step"] == settings["steps"]]
    final = {}
    for r in last:
        final.setdefault(r["start"], {})[r["split"]] = {k: r[k] for k in columns[3:]}
    write_json(os.path.join(a.out_dir, "summary.json"), {
        "preset": a.preset, "steps": settings["steps"], "lr": a.lr, "seed": a.seed,
        "training_pairs": n_pairs, "heldout_per_split": settings["heldout"],
        "wrapper_system_prompt": system, "final": final})
    lines = ["| start | held-out entities: execution / exact | new shapes: execution / exact "
             "| chatty |", "|---|---|---|---|"]
    for start, by_split in final.items():
        e, s = by_split["heldout_entities"], by_split["heldout_shapes"]
        lines.append(f"| {start} | {e['execution']:.1%} / {e['exact']:.1%} | "
                     f"{s['execution']:.1%} / {s['exact']:.1%} | "
                     f"{(e['chatty'] + s['chatty']) / 2:.1%} |")
    with open(os.path.join(a.out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(a.out_dir, curves)


def plot(out_dir, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: curves.csv only (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    panels = [("heldout_entities", "execution", "held-out entities: query runs right"),
              ("heldout_shapes", "execution", "new question shapes: query runs right"),
              (None, "chatty", "chatty answers (both sets)")]
    for ax, (split, key, title) in zip(axes, panels):
        for start in dict.fromkeys(r["start"] for r in curves):
            rows = [r for r in curves if r["start"] == start and split in (None, r["split"])]
            steps = sorted({r["step"] for r in rows})
            values = [sum(r[key] for r in rows if r["step"] == s) /
                      sum(1 for r in rows if r["step"] == s) for s in steps]
            ax.plot(steps, values, marker="o", label=start)
        ax.set(title=title, xlabel="fine-tuning steps", ylim=(-0.02, 1.02))
    axes[0].legend()
    fig.tight_layout()
    fig.savefig(os.path.join(out_dir, "curves.png"), dpi=100)
    print(f"wrote {os.path.join(out_dir, 'curves.png')}")


if __name__ == "__main__":
    main()
