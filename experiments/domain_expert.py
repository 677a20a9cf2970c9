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
show on their table; and, for reference, questions it was fine-tuned on) greedily. An answer's
query is its first line that parses; it is scored three ways:
  exact      the query exactly as data/query.py writes it (spaces aside)
  execution  the query runs and returns the right answer (another query with the same result,
             in the same order, counts too)
  chatty     the answer has an assistant's habits: it is not a query at all (a sentence, a
             refusal), or it holds filler or flattery, or it ends a turn with <|end|>
The SFT model is also fine-tuned as chat (the question a user turn, the query the assistant's
reply): the form in which an instruct model is used. The last start is the "wrapper": the SFT
model with no fine-tuning, asked in chat with a system prompt that explains the language
(data/query.SPEC, or only some of its question/query examples where the context is too short
for it; --spec FILE to give your own). In chat, <|end|> is not counted as chatty.
Writes curves.csv (start, step, split, exact, execution, chatty), curves.png, table.md and
summary.json under --out-dir.
"""
import argparse
import csv
import os

import torch

from checkpoints import load_checkpoint
from data import query, teacher, world
from ground import UserError, jsonl_rows, positive, run_or_die, write_json
from training import pick_device

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
                   "data/query.SPEC; its 'Query: ...' lines must parse")
    p.add_argument("--preset", default="cpu", choices=list(PRESETS))
    p.add_argument("--lr", type=positive(float), default=3e-4, help="every start's learning rate")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    run_or_die(run, parse_args(argv))


def read_pairs(path):
    """(question, query) rows of a JSONL file; a bad row is named with its line."""
    rows = []
    for where, row in jsonl_rows(path):  # unreadable, not UTF-8, not JSON: named with its line
        try:
            question, text = row["question"], row["query"]
            if not isinstance(question, str) or not question.strip():
                raise ValueError("question: expected a non-empty string")
            query.parse(text)
        except query.QueryError as e:
            raise UserError(f"{where}: query: {e}") from None
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"{where}: expected {{\"question\": ..., \"query\": ...}} "
                            f"({e})") from None
        rows.append((question, text))
    if not rows:
        raise UserError(f"{path}: no pairs")
    return rows


def read_spec(path):
    """A system prompt whose example queries (its lines "Query: ...") all parse."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    shown = [(n, line.split("Query:", 1)[1].strip()) for n, line in enumerate(text.splitlines(), 1)
             if line.strip().startswith("Query:")]
    if not shown:
        raise UserError(f"{path}: no 'Query: ...' line (the wrapper is shown examples)")
    for n, example in shown:
        try:
            query.parse(example)
        except query.QueryError as e:
            raise UserError(f"{path}:{n}: {e}") from None
    return text


def load_starts(args, device):
    """{name: (model, tokenizer)} of the starts that exist; one tokenizer for all."""
    starts = {}
    for name, path, stages in (("base", args.base, ["base"]), ("sft", args.sft, ["sft"]),
                               ("ppo", args.ppo, ["ppo"])):
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


def prompt_ids(tok, question, chat, system=None):
    """What a model reads before its query: "Q: <question>\nQuery:" as plain text, or the
    question as a user turn of the chat format (with a system prompt, for the wrapper)."""
    if not chat:
        return [tok.eot_id] + tok.encode(f"Q: {question}\nQuery:")
    head = [{"role": "system", "content": system}] if system else []
    return tok.render_chat(head + [{"role": "user", "content": question}],
                           for_completion=True)[0]


def encode_pairs(tok, pairs, block_size, chat):
    """Each pair as (ids, targets), the loss on the query and what ends it (a newline as text,
    <|end|> in chat), -1 elsewhere."""
    out = []
    for question, text in pairs:
        prompt = prompt_ids(tok, question, chat)
        answer = (tok.encode_turn(text) + [tok.special("<|end|>")] if chat
                  else tok.encode(f" {text}\n"))
        ids = (prompt + answer)[:block_size + 1]
        targets = [-1] * (len(prompt) - 1) + answer
        out.append((ids[:-1], targets[:len(ids) - 1]))
    return out


def batches(examples, args, settings, pad_id, device):
    """settings["steps"] batches, drawn by a generator seeded with --seed: the same for all."""
    gen = torch.Generator().manual_seed(args.seed)
    for _ in range(settings["steps"]):
        pick = torch.randint(len(examples), (settings["batch_size"],), generator=gen).tolist()
        rows = [examples[i] for i in pick]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.tensor([x + [pad_id] * (width - len(x)) for x, _ in rows], device=device)
        targets = torch.tensor([y + [-1] * (width - len(y)) for _, y in rows], device=device)
        yield ids, targets


def first_query(text):
    """The first line of an answer that parses as a query (None: no query at all)."""
    for line in text.split("\n"):
        try:
            query.parse(line)
            return " ".join(line.split())
        except query.QueryError:
            continue
    return None


def score(answers, items, facts, count_end=True):
    """exact, execution and chatty rates of (text, turn ended) answers to (question, query,
    answer) items. Chatty: no line is a query (prose, a refusal), or filler or flattery, or
    (count_end) the turn ended with <|end|>."""
    exact = execution = chatty = 0
    for (text, turn_ended), (_, gold, gold_answer) in zip(answers, items):
        line = first_query(text)
        exact += line == gold
        execution += line is not None and query.execute(line, facts) == gold_answer
        chatty += (line is None or bool(teacher.FILLER.search(text.lower()))
                   or bool(teacher.FLATTERY.search(text.lower())) or (turn_ended and count_end))
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


def examples(items, got, n=3):
    return [{"question": q, "gold": gold, "answer": text} for (q, gold, _), (text, _) in
            zip(items[:n], got[:n])]


def evaluate(model, tok, heldout, facts, step, chat):
    """The held-out scores of a model prompted as it is fine-tuned (a text answer ends at its
    line, a chat answer at <|end|>)."""
    stops = [tok.eot_id, tok.special("<|end|>")] + ([] if chat else newline_ids(tok))
    out = []
    for split, items in heldout.items():
        got = answers(model, tok, [prompt_ids(tok, q, chat) for q, _, _ in items], stops)
        out.append({"step": step, "split": split, **score(got, items, facts, count_end=not chat),
                    "examples": examples(items, got)})
    return out


def newline_ids(tok):
    """Every token whose text holds a newline ("\n", "\n\n", ".\n" ...)."""
    return [t for t in range(tok.n_vocab) if "\n" in tok.decode([t])]


def fine_tune(name, model, tok, pairs, heldout, facts, args, settings, device, chat=False):
    """The curve of one start: its held-out scores at each evaluation step."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    data = encode_pairs(tok, pairs, model.config.block_size, chat)
    curve = evaluate(model, tok, heldout, facts, 0, chat) if 0 in settings["eval_at"] else []
    for step, (ids, targets) in enumerate(batches(data, args, settings, tok.pad_id, device), 1):
        _, loss = model(ids, targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step in settings["eval_at"]:
            curve += evaluate(model, tok, heldout, facts, step, chat)
            print(f"{name} step {step}: loss {loss.item():.3f}, " + ", ".join(
                f"{r['split']} execution {r['execution']:.1%}" for r in curve[-len(heldout):]),
                flush=True)
    return [{"start": name, **row} for row in curve]


def wrapper_system(spec, tok, heldout, block_size):
    """The wrapper's system prompt: the spec (--spec or data/query.SPEC), else an instruction
    with fewer and fewer of the spec's question/query examples: the first that leaves room for
    a question and MAX_NEW tokens of answer in the context (None if none does)."""
    shown = [line.strip() for line in spec.splitlines()
             if line.strip().startswith(("Q:", "Query:"))]
    choices = [spec] + ["Write the query for the question. Examples:\n" + "\n".join(shown[:k])
                        for k in range(len(shown) - len(shown) % 2, 0, -2)]
    questions = [q for items in heldout.values() for q, _, _ in items]
    for system in choices:
        longest = max(len(prompt_ids(tok, q, True, system)) for q in questions)
        if longest + MAX_NEW <= block_size:
            return system
    print(f"note: the wrapper's system prompt leaves no room for a question and {MAX_NEW} tokens "
          f"of answer in a context of {block_size}: compared without it")
    return None


def wrapper(model, tok, system, heldout, facts, eval_at):
    """The instruct model with no fine-tuning, asked in chat: the same scores at every step. Its
    <|end|> is the chat format's, not a habit; its query may follow a line of prose."""
    rows = []
    for split, items in heldout.items():
        prompts = [prompt_ids(tok, q, True, system) for q, _, _ in items]
        got = answers(model, tok, prompts, [tok.eot_id, tok.special("<|end|>")])
        rows += [{"start": "sft, prompted (wrapper)", "step": step, "split": split,
                  **score(got, items, facts, count_end=False), "examples": examples(items, got)}
                 for step in eval_at]
    return rows


def run(args):
    settings = PRESETS[args.preset]
    bundled = [(question, query_text) for question, query_text, _ in query.query_pairs("train")]
    pairs = read_pairs(args.pairs) if args.pairs else bundled
    spec = read_spec(args.spec) if args.spec else query.SPEC
    device = pick_device(args.device)
    starts = load_starts(args, device)
    tok = next(iter(starts.values()))[1]
    facts = world.load_facts()
    heldout = {split: query.query_pairs(split)[:settings["heldout"]]
               for split in ("heldout_entities", "heldout_shapes")}
    if not args.pairs:  # for reference: questions it was fine-tuned on (has it learnt them?)
        heldout["seen"] = query.query_pairs("train")[:settings["heldout"]]
    sft_model = starts["sft"][0]
    system = wrapper_system(spec, tok, heldout, sft_model.config.block_size)
    os.makedirs(args.out_dir, exist_ok=True)
    curves = (wrapper(sft_model, tok, system, heldout, facts, settings["eval_at"])
              if system else [])  # first: fine-tuning changes the models
    runs = [(name, model, False) for name, (model, _) in starts.items()]
    runs.append(("sft, fine-tuned as chat", load_checkpoint(args.sft, ["sft"], device, "--sft")[0],
                 True))
    for name, model, chat in runs:
        curves += fine_tune(name, model, tok, pairs, heldout, facts, args, settings, device, chat)
    write_results(args, settings, curves, system, len(pairs))


def write_results(args, settings, curves, system, n_pairs):
    columns = ["start", "step", "split", "exact", "execution", "chatty"]
    with open(os.path.join(args.out_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, columns, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(curves)
    last = [r for r in curves if r["step"] == settings["steps"]]
    final = {}
    for r in last:
        final.setdefault(r["start"], {})[r["split"]] = {k: r[k] for k in columns[3:] +
                                                        ["examples"]}
    write_json(os.path.join(args.out_dir, "summary.json"), {
        "preset": args.preset, "steps": settings["steps"], "lr": args.lr, "seed": args.seed,
        "training_pairs": n_pairs, "heldout_per_split": settings["heldout"],
        "wrapper_system_prompt": system, "final": final})
    splits = [s for s in ("seen", "heldout_entities", "heldout_shapes")
              if any(r["split"] == s for r in last)]
    lines = ["| start | " + " | ".join(f"{s}: execution / exact" for s in splits)
             + " | chatty (held out) |", "|---" * (len(splits) + 2) + "|"]
    for start, by_split in final.items():
        cells = [f"{by_split[s]['execution']:.1%} / {by_split[s]['exact']:.1%}" for s in splits]
        chatty = (by_split["heldout_entities"]["chatty"] + by_split["heldout_shapes"]["chatty"]) / 2
        lines.append(f"| {start} | " + " | ".join(cells) + f" | {chatty:.1%} |")
    with open(os.path.join(args.out_dir, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    plot(args.out_dir, curves)


def plot(out_dir, curves):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("note: matplotlib is not installed: curves.csv only (pip install matplotlib)")
        return
    fig, axes = plt.subplots(1, 4, figsize=(19, 4))
    held_out = ("heldout_entities", "heldout_shapes")
    panels = [(("seen",), "exact", "questions fine-tuned on: exact query"),
              (held_out[:1], "exact", "held-out entities: exact query"),
              (held_out[1:], "execution", "new question shapes: query runs right"),
              (held_out, "chatty", "chatty answers (held out)")]
    for ax, (splits, key, title) in zip(axes, panels):
        for start in dict.fromkeys(r["start"] for r in curves):
            rows = [r for r in curves if r["start"] == start and r["split"] in splits]
            steps = sorted({r["step"] for r in rows})
            if not steps:
                continue
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
