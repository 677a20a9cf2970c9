"""Stage 2: supervised fine-tuning (SFT) turns the base model into an instruct model.

The base model already knows the facts: pretraining put them there. What it lacks is the
behaviour: that a question in the chat format gets an answer, in the style the system prompt
asks for, and that the turn then ends with <|end|>. SFT shows it conversations and trains only on
the assistant's tokens (render_chat's loss mask), so the model learns to *answer*, not to imitate
users. The bundled chats are about a part of the entities only; eval.json then measures answers
about the held-out rest, which the model knows from pretraining alone.

    python sft.py                                    # out/base -> out/sft on the bundled chats
    python sft.py --data chats.jsonl                 # your chats: {"messages": [...]} per line,
                                                     # or Alpaca {"instruction", "input", "output"}
    python sft.py --resume                           # continue an interrupted run
    torchrun --standalone --nproc_per_node=2 sft.py  # DDP

Replay: every step also trains on a few sequences of the base model's pretraining data
(--replay, --replay-data). Without it, a model this small learns the chat format by memorising
the fine-tuning facts, and answers a held-out question with a fact it was fine-tuned on (the
capital of some other country). Keeping the pretraining task alive beside the chats is what lets
the chat format reach the knowledge of pretraining (README: Results).

Conversations longer than the context are left out of training (their number is printed): a
truncated conversation would teach answers that stop mid-sentence without <|end|>.
"""
import argparse
import hashlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tqdm import tqdm

from common import (SAVE_EVERY_SECONDS, TOKENIZER_FILE, UserError, MetricsLog, autocast,
                    check_out_dir, check_weights, launch, load_checkpoint, lr_at,
                    make_optimizer, nonnegative, pick_dtype, positive, prepare_out_dir,
                    save_checkpoint, seed_arg, wrap_model, write_json)
from data import chats, prepare, teacher, world
from data.tokenizer import Tokenizer, check_chat
from pretrain import batch as lm_batch

PRESETS = {  # replay: pretraining sequences mixed into every step (see the module docstring)
    "tiny": dict(batch_size=16, micro_batch=16, epochs=1, lr=1e-3, warmup=5, eval_every=25,
                 replay=0),
    "cpu": dict(batch_size=32, micro_batch=16, epochs=4, lr=5e-4, warmup=20, eval_every=100,
                replay=16),
    "gpu": dict(batch_size=64, micro_batch=64, epochs=4, lr=2e-4, warmup=50, eval_every=200,
                replay=32),
}
CONFIG_KEYS = set(PRESETS["cpu"]) | {"seed", "weight_decay", "grad_clip", "replay_data", "data",
                                     "init_from"}
VAL_FRACTION = 0.05


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="auto = gpu on CUDA, else cpu; flags below override its values")
    p.add_argument("--init-from", help="base checkpoint (default: out/base; on --resume, the "
                   "run's own, which the final evaluation compares against)")
    p.add_argument("--data", metavar="JSONL",
                   help="your chats (default: the bundled world's SFT chats)")
    p.add_argument("--out-dir", default="out/sft", help="checkpoint folder (default: out/sft)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fail-soft)")
    p.add_argument("--seed", type=seed_arg, default=None, help="data order (default 1337)")
    g = p.add_argument_group("optimisation (defaults from the preset)")
    g.add_argument("--epochs", type=positive(int), help="passes over the training chats")
    g.add_argument("--batch-size", type=positive(int), help="conversations per step, all processes")
    g.add_argument("--micro-batch", type=positive(int), help="conversations per forward pass")
    g.add_argument("--lr", type=positive(float), help="peak learning rate (cosine to lr/10)")
    g.add_argument("--warmup", type=nonnegative(int), help="linear warmup steps (0: none)")
    g.add_argument("--weight-decay", type=nonnegative(float), help="default 0.0")
    g.add_argument("--grad-clip", type=nonnegative(float),
                   help="max grad norm (default 1.0; 0 = no clipping)")
    g.add_argument("--eval-every", type=positive(int),
                   help=f"steps between held-out loss + checkpoint (a checkpoint also at least "
                        f"every {SAVE_EVERY_SECONDS} s)")
    g.add_argument("--replay", type=nonnegative(int),
                   help="pretraining sequences per step (0: none)")
    g.add_argument("--replay-data", help="the base model's prepared pretraining data (default: "
                   "the bundled world)")
    g.add_argument("--stop-at", type=positive(int), help="stop after this step as if interrupted")
    g.add_argument("--no-behaviour-eval", action="store_true",
                   help="skip the judged evaluation at the end (eval.json: loss only)")
    return p.parse_args(argv)


# ----------------------------------------------------------------------------- data
def read_jsonl(path):
    """Chats from a JSONL file, one per line: {"messages": [...]} or Alpaca-style
    {"instruction", "input" (optional), "output"}. Errors name the file, line and field."""
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    out = []
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None
        if isinstance(row, dict) and "messages" in row:
            chat = row["messages"]
        elif isinstance(row, dict) and "instruction" in row:
            for field in ("instruction", "output"):
                if not isinstance(row.get(field), str) or not row[field].strip():
                    raise UserError(f"{where}: field '{field}' missing, empty or not a string")
            if not isinstance(row.get("input", ""), str):
                raise UserError(f"{where}: field 'input' must be a string")
            prompt = "\n\n".join(t for t in (row["instruction"], row.get("input", "")) if t)
            chat = [{"role": "user", "content": prompt},
                    {"role": "assistant", "content": row["output"]}]
        else:
            raise UserError(f"{where}: expected a 'messages' field (chat) or 'instruction' "
                            "and 'output' fields (Alpaca)")
        try:
            check_chat(chat)
        except ValueError as e:
            raise UserError(f"{where}: field 'messages': {e}") from None
        out.append(chat)
    if not out:
        raise UserError(f"{path}: no conversations")
    return out


def encode(tok, convs, block_size):
    """(input ids, targets) per conversation: targets are the next tokens where the loss mask
    is 1, and -1 (ignored) elsewhere. Returns the examples and how many were too long."""
    examples, too_long = [], 0
    for chat in convs:
        ids, mask = tok.render_chat(chat)
        if len(ids) > block_size + 1:
            too_long += 1
            continue
        examples.append((ids[:-1], [t if m else -1 for t, m in zip(ids[1:], mask[1:])]))
    return examples, too_long


def collate(examples, pad_id, device):
    """Right-pad to the longest: padding is never a target (-1), so it is never trained on."""
    T = max(len(x) for x, _ in examples)
    x = torch.tensor([ids + [pad_id] * (T - len(ids)) for ids, _ in examples], device=device)
    y = torch.tensor([tgt + [-1] * (T - len(tgt)) for _, tgt in examples], device=device)
    return x, y


def step_indices(step, n, c):
    """The conversations of optimizer step `step`: epoch e is a fresh permutation seeded by
    (seed, e). A pure function of the step, so --resume needs nothing but the step count."""
    per_epoch = n // c["batch_size"]
    epoch, i = divmod(step, per_epoch)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(c["seed"] * 1000 + epoch))
    return perm[i * c["batch_size"]:(i + 1) * c["batch_size"]]


def masked_loss_sum(model, x, y):
    """Sum (not mean) of cross-entropy over target tokens: the caller divides by the number of
    target tokens in the whole batch, so every assistant token weighs the same however the
    conversations are split into micro-batches and processes."""
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                           reduction="sum")


@torch.no_grad()
def val_loss(model, examples, c, tok, device, dtype):
    """Mean loss per assistant token of the held-out conversations; None when there are none."""
    if not examples:
        return None
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(examples), c["micro_batch"]):
        x, y = collate(examples[i:i + c["micro_batch"]], tok.pad_id, device)
        with autocast(device, dtype):
            total += masked_loss_sum(model, x, y).item()
        count += int((y != -1).sum())
    model.train()
    return total / count


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def answer(model, tok, prompts, max_new=48, batch_size=64, temperature=0.0, seed=0):
    """Generate from token-id prompts; returns (text, ended with <|end|>, n tokens) per prompt."""
    stops = [tok.special("<|end|>"), tok.eot_id]
    if max(map(len, prompts)) >= model.config.block_size:
        raise ValueError(f"a prompt of {max(map(len, prompts))} tokens leaves no room in the "
                         f"context of {model.config.block_size}")
    out = []
    for i in range(0, len(prompts), batch_size):
        batch = prompts[i:i + batch_size]
        room = model.config.block_size - max(map(len, batch))
        rows = model.generate(batch, min(max_new, room), temperature=temperature, top_k=50,
                              stop_ids=stops, pad_id=tok.pad_id, seed=seed + i)
        for r in rows:
            ended = bool(r) and r[-1] == stops[0]
            body = r[:-1] if r and r[-1] in stops else r
            out.append((tok.decode(body), ended, len(body)))
    return out


def evaluate_chat(model, tok, items, examples=3):
    """Judge the model's answers to chat prompts (greedy) with the teacher. Used for every
    instruct stage: accuracy, end-of-turn rate, length, and adherence per system behaviour."""
    model.eval()
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    results = answer(model, tok, prompts)
    verdicts = [teacher.judge(it, text, ended) for it, (text, ended, _) in zip(items, results)]
    r = {"n": len(items),
         "accuracy": sum(v["correct"] for v in verdicts) / len(items),
         "end_of_turn_rate": sum(v["ended"] for v in verdicts) / len(items),
         "mean_length_tokens": sum(n for _, _, n in results) / len(items),
         "mean_score": sum(v["score"] for v in verdicts) / len(items)}
    for b in sorted({it["behaviour"] for it in items}):
        mine = [v for it, v in zip(items, verdicts) if it["behaviour"] == b]
        r[f"accuracy_{b}"] = sum(v["correct"] for v in mine) / len(mine)
        if b != "none":
            r[f"adherence_{b}"] = sum(v["follows_system"] for v in mine) / len(mine)
    r["examples"] = [{"prompt": it["messages"], "response": text, "ended": ended}
                     for it, (text, ended, _) in list(zip(items, results))[:examples]]
    model.train()
    return r


def evaluate_base_on_chat_prompts(model, tok, items):
    """The base model on the same requests: rendered as chat (it was never taught the format)
    and as plain text (it continues the pattern: more questions)."""
    r = {f"chat_{k}": v for k, v in evaluate_chat(model, tok, items, examples=0).items()
         if k in ("accuracy", "end_of_turn_rate")}
    plain = [[tok.eot_id] + tok.encode(chats.plain_prompt(it["messages"])) for it in items]
    texts = [t for t, _, _ in answer(model, tok, plain, max_new=24, temperature=1.0)]
    verdicts = [teacher.judge(it, t, False) for it, t in zip(items, texts)]
    r["plain_question_rate"] = sum(map(world.is_question, texts)) / len(texts)
    r["plain_accuracy"] = sum(v["correct"] for v in verdicts) / len(texts)
    for b in sorted({it["behaviour"] for it in items} - {"none"}):
        follows = [v["follows_system"] for it, v in zip(items, verdicts) if it["behaviour"] == b]
        r[f"plain_adherence_{b}"] = sum(follows) / len(follows)
    r["plain_examples"] = [chats.plain_prompt(it["messages"]) + t for it, t in
                           list(zip(items, texts))[:2]]
    return r


# ----------------------------------------------------------------------------- training
def load_replay(c, tok, T, world_size, master):
    """The pretraining tokens every step replays, and their checksum (None, None: no replay)."""
    if not c["replay"]:
        return None, None
    path = c["replay_data"] or prepare.DEFAULT_OUT
    if not c["replay_data"] and master:
        prepare.refresh(path)  # the bundled world, prepared on first use
    if world_size > 1:
        dist.barrier()
    try:
        replay, meta = prepare.load_tokens(path, "train")
    except ValueError as e:
        raise UserError(f"{e} (--replay-data; or --replay 0 to train without replay)") from e
    if len(replay) <= T + 1:
        raise UserError(f"{path}: too little data to replay sequences of {T}")
    if meta["tokenizer_checksum"] != tok.checksum:
        raise UserError(f"{path} was not tokenized with the tokenizer of the model; pass its "
                        "pretraining data as --replay-data, or --replay 0")
    return replay, meta["data_checksum"]


def check_resumed_run(c, a, tok):
    """Settings come from the run being resumed, and a path it recorded that is gone (the project
    moved) is asked for by its flag."""
    if a.preset not in ("auto", c["preset"]):
        raise UserError(f"--preset {a.preset}: the run being resumed is a '{c['preset']}' run; a "
                        "resumed run keeps its settings (drop --preset)")
    needed = [("--data", c["data"])]
    if c["replay"]:
        needed.append(("--replay-data", c["replay_data"]))  # None: the bundled world
    if needs_base_eval(c, a):  # the final evaluation compares with the base model
        needed.append(("--init-from", c["init_from"]))
    for flag, path in needed:
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found; the run in {a.out_dir} needs it: pass "
                            f"{flag} with where it is now")
    base_tok = os.path.join(c["init_from"], TOKENIZER_FILE)
    if needs_base_eval(c, a) and Tokenizer.load(base_tok).checksum != tok.checksum:
        raise UserError(f"--init-from {c['init_from']}: not the base model this run started from "
                        "(another tokenizer)")


def needs_base_eval(c, a):
    return not c["data"] and not a.no_behaviour_eval


def check_eval_fits(tok, block_size):
    """Fail before training, not after it, if the evaluation prompts cannot fit the context."""
    items = chats.eval_prompts("heldout")
    longest = max(max(len(tok.render_chat(it["messages"], for_completion=True)[0]),
                      1 + len(tok.encode(chats.plain_prompt(it["messages"])))) for it in items)
    if longest >= block_size:
        raise UserError(f"the evaluation prompts need a context of more than {longest} tokens; "
                        f"the model's is {block_size} (--no-behaviour-eval skips them)")


def main(argv=None):
    launch(run, parse_args(argv))


def run(a, rank, world_size, device, master):
    given = {k: v for k, v in vars(a).items() if v is not None and k in CONFIG_KEYS}
    ckpt = None
    if a.resume:  # paths come from the run's config, unless given again (the project moved)
        model, tok, ckpt = load_checkpoint(a.out_dir, ["sft"], device, flag="--resume")
        c = {**ckpt["config"], **given}
        check_resumed_run(c, a, tok)
    else:
        preset = a.preset if a.preset != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
        c = {**PRESETS[preset], "preset": preset, "seed": 1337, "weight_decay": 0.0,
             "grad_clip": 1.0, "init_from": "out/base", "data": None, "replay_data": None,
             **given}  # replay_data None: the bundled world, wherever the project is
        check_out_dir(a.out_dir, resume=False, source=c["init_from"])
        model, tok, _ = load_checkpoint(c["init_from"], ["base"], device, flag="--init-from")
    if given.get("replay_data") and not c["replay"]:
        raise UserError("--replay-data is read only with --replay above 0")
    if needs_base_eval(c, a):
        check_eval_fits(tok, model.config.block_size)
    convs = read_jsonl(c["data"]) if c["data"] else chats.sft_chats()
    chats_checksum = hashlib.sha256(json.dumps(convs, sort_keys=True).encode()).hexdigest()
    if ckpt is not None and ckpt.get("chats_checksum") != chats_checksum:
        raise UserError(f"the chats differ from those the run in {a.out_dir} was trained on")
    n_val = max(1, int(len(convs) * VAL_FRACTION)) if len(convs) > 1 else 0
    T = model.config.block_size
    train, dropped = encode(tok, convs[n_val:], T)
    val, val_dropped = encode(tok, convs[:n_val], T)  # never the training conversations
    if master and dropped:
        print(f"note: {dropped} conversations longer than the context ({T} tokens) are left out",
              file=sys.stderr)
    if master and not val:
        why = ("a single conversation leaves none to hold out" if n_val == 0 else
               f"all {val_dropped} held-out conversations are longer than the context")
        print(f"note: val_loss is not measured: {why}", file=sys.stderr)
    if "micro_batch" not in given:  # the preset's micro-batch, split over the processes
        c["micro_batch"] = max(1, min(c["micro_batch"], c["batch_size"] // world_size))
    per_step = c["micro_batch"] * world_size
    if c["batch_size"] % per_step:
        raise UserError(f"--batch-size {c['batch_size']} must be a multiple of --micro-batch x "
                        f"processes = {per_step}")
    if len(train) < c["batch_size"]:
        raise UserError(f"{len(train)} training conversations: fewer than one batch "
                        f"(--batch-size {c['batch_size']})")
    accum = c["batch_size"] // per_step
    if c["replay"] % (accum * world_size):
        raise UserError(f"--replay {c['replay']} must be a multiple of accumulation steps x "
                        f"processes = {accum * world_size}")
    replay, replay_checksum = load_replay(c, tok, T, world_size, master)
    replayed = ckpt.get("replay_checksum") if ckpt is not None else None
    if replayed and replay_checksum and replayed != replay_checksum:
        raise UserError(f"--replay-data {c['replay_data'] or '(the bundled world)'} is not the "
                        f"data the run in {a.out_dir} replayed; pass that data, or start a new run")
    steps = c["epochs"] * (len(train) // c["batch_size"])
    prepare_out_dir(a.out_dir, tok, resume=ckpt is not None, write=master)

    dtype = pick_dtype(a.dtype, device)
    dev_type = device.split(":")[0]
    opt = make_optimizer(model, c["lr"], c["weight_decay"], device)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == torch.float16)
    step, last_val = 0, None
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        step, last_val = ckpt["step"], ckpt.get("val_loss")
    raw = model
    model = wrap_model(model, a.compile, world_size, device, T)
    log = MetricsLog(os.path.join(a.out_dir, "log.jsonl"), enabled=master,
                     resume_step=step if ckpt is not None else None)
    if master:
        print(f"SFT: {len(train)} conversations ({len(val)} held out for loss), {c['epochs']} "
              f"epoch(s) = {steps} steps of {c['batch_size']}, {device}", file=sys.stderr)
    stop = min(steps, a.stop_at or steps)
    model.train()
    last_save = time.time()
    # Ctrl-C, a non-finite loss or a failed write stops the run here; launch() says what is saved
    with tqdm(total=stop, initial=step, disable=not master, desc="sft", dynamic_ncols=True) as bar:
        while step < stop:
            t0 = time.time()
            lr = lr_at(step, c["lr"], c["warmup"], steps)
            for group in opt.param_groups:
                group["lr"] = lr
            batch = [train[i] for i in step_indices(step, len(train), c).tolist()]
            n_targets = sum(sum(t != -1 for t in tgt) for _, tgt in batch)
            mine = batch[rank::world_size]
            if replay is not None:  # offsets are a function of the step, like the batch
                g = torch.Generator().manual_seed(c["seed"] * 1_000_003 + step)
                offsets = torch.randint(len(replay) - T - 1, (c["replay"],), generator=g)
                offsets = offsets.view(accum, world_size, -1)[:, rank]
            losses = torch.zeros(2, device=device)  # SFT loss, replay loss of this step
            for i in range(accum):
                x, y = collate(mine[i * c["micro_batch"]:(i + 1) * c["micro_batch"]],
                               tok.pad_id, device)
                if world_size > 1:
                    model.require_backward_grad_sync = i == accum - 1
                with autocast(device, dtype):
                    # DDP averages gradients over processes; x world_size turns that into a sum
                    sft_loss = masked_loss_sum(model, x, y) * world_size / n_targets
                    rep_loss = torch.zeros((), device=device)
                    if replay is not None:  # plus the pretraining loss, as in pretrain.py
                        rep_loss = model(*lm_batch(replay, offsets[i], T, device))[1] / accum
                scaler.scale(sft_loss + rep_loss).backward()
                losses += torch.stack([sft_loss.detach(), rep_loss.detach()])
            scaler.unscale_(opt)
            if c["grad_clip"] > 0:  # 0 means no clipping, as in nanoGPT
                torch.nn.utils.clip_grad_norm_(raw.parameters(), c["grad_clip"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if world_size > 1:
                dist.all_reduce(losses)
            loss, loss_replay = (losses / world_size).tolist()
            if not math.isfinite(loss + loss_replay):
                raise FloatingPointError(f"loss is {loss} (replay {loss_replay}) at step {step}")
            step += 1
            stats = dict(step=step, loss=round(loss, 4), replay_loss=round(loss_replay, 4), lr=lr,
                         s_per_step=round(time.time() - t0, 3))
            evaluate = step % c["eval_every"] == 0 or step == stop
            if evaluate:  # None when no held-out conversation fits the context
                held_out = val_loss(raw, val, c, tok, device, dtype)
                if held_out is not None and not math.isfinite(held_out):
                    raise FloatingPointError(f"held-out loss is {held_out} at step {step}")
                last_val = stats["val_loss"] = None if held_out is None else round(held_out, 4)
            log.write(**stats)  # before the checkpoint: a resume never lacks a logged step
            if evaluate or time.time() - last_save > SAVE_EVERY_SECONDS:
                check_weights(raw, x, step)
                if master:
                    save_checkpoint(a.out_dir, "sft", raw, tok, config=c, step=step,
                                    val_loss=last_val, optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict(), chats_checksum=chats_checksum,
                                    replay_checksum=replay_checksum)
                last_save = time.time()
            bar.update(1)
            shown = ("loss", "val_loss") + (("replay_loss",) if replay is not None else ())
            bar.set_postfix({k: stats[k] for k in shown if stats.get(k) is not None})
    if not master or step < steps:
        return
    result = {"stage": "sft", "preset": c["preset"], "steps": step, "val_loss": last_val,
              "val_conversations": len(val), "val_left_out_too_long": val_dropped,
              "train_conversations": len(train), "device": device}
    if needs_base_eval(c, a):
        t0 = time.time()
        items = chats.eval_prompts("heldout")
        result["heldout"] = evaluate_chat(raw, tok, items)
        base, _, _ = load_checkpoint(c["init_from"], ["base"], device, flag="--init-from")
        result["base_on_same_prompts"] = evaluate_base_on_chat_prompts(base, tok, items)
        result["eval_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(a.out_dir, "eval.json"), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    for k in ("heldout", "base_on_same_prompts"):
        if k in result:
            print(k, json.dumps({m: v for m, v in result[k].items() if "examples" not in m}))


if __name__ == "__main__":
    main()
