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
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import (TOKENIZER_FILE, MetricsLog, load_checkpoint, prepare_out_dir,
                         save_checkpoint)
from cli import check_paths_exist, launch, parse_stage_args, setting, start_or_resume
from data import chats, prepare
from data.tokenizer import Tokenizer, check_chat
from evaluation import (audit_summary, check_chat_eval_fits, evaluate_base_on_chat_prompts,
                        evaluate_code, evaluate_instruct, knowledge_audit, known_map,
                        eval_sets_digest, instruct_eval_sets, weights_digest, write_knowledge)
from ground import UserError, jsonl_rows, nonnegative, seed_arg, write_json
from training import (SAVE_EVERY_SECONDS, SaveClock, autocast, barrier, batch_indices,
                      check_finite, check_weights, lm_batch, lr_at, make_optimizer,
                      mean_over_processes, optimizer_step, resume_training, split_batch,
                      throughput, wrap_model)


@dataclass
class Settings:
    """An SFT run. The defaults are the cpu preset; checkpoints save these, and --resume
    continues with them."""
    init_from: str = setting("out/base", "the base checkpoint to fine-tune (on --resume: the "
                                         "run's own, which the final evaluation compares with)")
    data: str = setting(None, "your chats, JSONL: {\"messages\": [...]} or Alpaca {\"instruction"
                              "\", \"input\", \"output\"} per line (default: the bundled chats)")
    epochs: int = setting(4, "passes over the training chats")
    batch_size: int = setting(32, "conversations per optimizer step, all processes together")
    micro_batch: int = setting(16, "conversations per forward pass per process; the rest of the "
                                   "batch is gradient accumulation")
    lr: float = setting(1e-3, "peak learning rate, half pretraining's: gentler SFT states fewer "
                              "held-out facts, not more (README: the SFT ablations)")
    warmup: int = setting(20, "linear warmup steps, then cosine decay to lr/10 (0: none)",
                          nonnegative(int))
    weight_decay: float = setting(0.0, "AdamW decay, matrices only: none, the run is short",
                                  nonnegative(float))
    grad_clip: float = setting(1.0, "max gradient norm (0: no clipping)", nonnegative(float))
    eval_every: int = setting(100, "steps between held-out loss + checkpoint (a checkpoint also "
                                   f"at least every {SAVE_EVERY_SECONDS} s)")
    replay: int = setting(16, "pretraining sequences replayed per step, so that the chat format "
                              "reaches pretraining's knowledge (0: none; module docstring)",
                          nonnegative(int))
    replay_data: str = setting(None, "the base model's prepared pretraining data (default: the "
                                     "bundled world)")
    seed: int = setting(1337, "order of the conversations and of the replayed sequences",
                        seed_arg)
    preset: str = "cpu"  # the preset these settings started from (recorded, not a flag)


PRESETS = {
    "tiny": dict(batch_size=16, micro_batch=16, epochs=1, lr=1e-3, warmup=5, eval_every=25,
                 replay=0),
    "cpu": dict(),  # the defaults above
    "gpu": dict(batch_size=64, micro_batch=64, epochs=4, lr=2e-4, warmup=50, eval_every=200,
                replay=32),
}
VAL_FRACTION = 0.05  # of the conversations, held out for the validation loss


def parse_args(argv=None):
    def own_flags(p):
        p.add_argument("--no-behaviour-eval", action="store_true",
                       help="skip the judged evaluation at the end (eval.json: loss only)")
    return parse_stage_args(argv, __doc__, Settings, PRESETS, "out/sft", own_flags)


# ----------------------------------------------------------------------------- data
def read_jsonl(path):
    """Chats from a JSONL file, one per line: {"messages": [...]} or Alpaca-style
    {"instruction", "input" (optional), "output"}. Errors name the file, line and field."""
    out = []
    for where, row in jsonl_rows(path):
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
    examples = []
    too_long = 0
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


def masked_loss_sum(model, x, y):
    """Sum (not mean) of cross-entropy over target tokens: the caller divides by the number of
    target tokens in the whole batch, so every assistant token weighs the same however the
    conversations are split into micro-batches and processes."""
    logits, _ = model(x)
    return F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-1,
                           reduction="sum")


@torch.no_grad()
def val_loss(model, examples, micro_batch, tok, proc):
    """Mean loss per assistant token of the held-out conversations; None when there are none."""
    if not examples:
        return None
    model.eval()
    total = 0.0
    count = 0
    for i in range(0, len(examples), micro_batch):
        x, y = collate(examples[i:i + micro_batch], tok.pad_id, proc.device)
        with autocast(proc.device, proc.dtype):
            total += masked_loss_sum(model, x, y).item()
        count += int((y != -1).sum())
    model.train()
    return total / count


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    launch(run, parse_args(argv))


def run(args, proc):
    # paths come from the run's settings, unless given again (the project moved)
    settings, model, tok, ckpt = start_or_resume(args, "sft", Settings, PRESETS, proc.device)
    if ckpt is None:
        model, tok, _ = load_checkpoint(settings.init_from, ["base"], proc.device,
                                        flag="--init-from")
    check_settings(args, settings, tok, model.config.block_size)
    train_set, val_set, val_dropped, chats_checksum = load_chats(
        settings, tok, model.config.block_size, proc)
    if ckpt is not None and ckpt.get("chats_checksum") != chats_checksum:
        raise UserError(f"the chats differ from those the run in {args.out_dir} was trained on")
    settings.micro_batch, accum = split_batch(settings.batch_size, settings.micro_batch, proc,
                                              "micro_batch" in args.given)
    replay, replay_checksum = load_replay(settings, tok, model.config.block_size, accum, proc)
    replayed = ckpt.get("replay_checksum") if ckpt is not None else None
    if replayed and replay_checksum and replayed != replay_checksum:
        raise UserError(f"--replay-data {settings.replay_data or '(the bundled world)'} is not the "
                        f"data the run in {args.out_dir} replayed; pass that data, or start a "
                        "new run")
    prepare_out_dir(args.out_dir, tok, resume=args.resume, write=proc.master)
    steps = settings.epochs * (len(train_set) // settings.batch_size)
    if proc.master:
        print(f"SFT: {len(train_set)} conversations ({len(val_set)} held out for loss), "
              f"{settings.epochs} epoch(s) = {steps} steps of {settings.batch_size}, {proc.device}",
              file=sys.stderr)
    checksums = dict(chats_checksum=chats_checksum, replay_checksum=replay_checksum)
    step, val = train(args, settings, model, tok, train_set, val_set, replay, checksums, proc,
                      ckpt, steps)
    if proc.master and step >= steps:
        sizes = {"val_conversations": len(val_set), "val_left_out_too_long": val_dropped,
                 "train_conversations": len(train_set)}
        final_evaluation(args, settings, model, tok, sizes, step, val, proc.device)


def needs_base_eval(settings, args):
    return not settings.data and not args.no_behaviour_eval


def check_settings(args, settings, tok, block_size):
    """Mistakes that would otherwise surface after training: a flag without effect, a path of
    the resumed run that has moved, evaluation prompts that do not fit the context."""
    if "replay_data" in args.given and not settings.replay:
        raise UserError("--replay-data is read only with --replay above 0")
    if args.resume:
        needed = [("--data", settings.data),
                  ("--replay-data", settings.replay_data if settings.replay else None),
                  ("--init-from", settings.init_from if needs_base_eval(settings, args) else None)]
        check_paths_exist(needed, args.out_dir)
        base_tok = os.path.join(settings.init_from, TOKENIZER_FILE)
        if needs_base_eval(settings, args) and Tokenizer.load(base_tok).checksum != tok.checksum:
            raise UserError(f"--init-from {settings.init_from}: not the base model this run "
                            "started from (another tokenizer)")
    if needs_base_eval(settings, args):
        check_chat_eval_fits(tok, block_size)


def load_chats(settings, tok, T, proc):
    """(training examples, held-out examples, how many held-out ones were too long, checksum of
    the chats). The first VAL_FRACTION of the conversations are held out, never trained on."""
    convs = read_jsonl(settings.data) if settings.data else chats.sft_chats()
    checksum = hashlib.sha256(json.dumps(convs, sort_keys=True).encode()).hexdigest()
    n_val = max(1, int(len(convs) * VAL_FRACTION)) if len(convs) > 1 else 0
    train_set, dropped = encode(tok, convs[n_val:], T)
    val_set, val_dropped = encode(tok, convs[:n_val], T)
    if proc.master and dropped:
        print(f"note: {dropped} conversations longer than the context ({T} tokens) are left out",
              file=sys.stderr)
    if proc.master and not val_set:
        why = ("a single conversation leaves none to hold out" if n_val == 0 else
               f"all {val_dropped} held-out conversations are longer than the context")
        print(f"note: val_loss is not measured: {why}", file=sys.stderr)
    if len(train_set) < settings.batch_size:
        raise UserError(f"{len(train_set)} training conversations: fewer than one batch "
                        f"(--batch-size {settings.batch_size})")
    return train_set, val_set, val_dropped, checksum


def load_replay(settings, tok, T, accum, proc):
    """The pretraining tokens every step replays, and their checksum (None, None: no replay)."""
    if not settings.replay:
        return None, None
    if settings.replay % (accum * proc.world_size):  # the same number in every micro-batch
        raise UserError(f"--replay {settings.replay} must be a multiple of accumulation steps x "
                        f"processes = {accum * proc.world_size}")
    path = settings.replay_data or prepare.DEFAULT_OUT
    if not settings.replay_data and proc.master:
        prepare.refresh(path)  # the bundled world, prepared on first use
    barrier(proc)
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


def replay_offsets(step, high, settings, accum, proc):
    """Where this process's replayed sequences of a step start, per micro-batch: a function of
    the step (like the step's conversations), so --resume needs nothing more."""
    g = torch.Generator().manual_seed(settings.seed * 1_000_003 + step)
    offsets = torch.randint(high, (settings.replay,), generator=g)
    return offsets.view(accum, proc.world_size, -1)[:, proc.rank]


def train(args, settings, raw, tok, train_set, val_set, replay, checksums, proc, ckpt, steps):
    """The SFT loop: the masked loss on the assistant tokens of a batch of chats, plus the loss
    on a few replayed pretraining sequences; one optimizer step; held-out loss and checkpoint now
    and then. Returns (steps done, last validation loss)."""
    T = raw.config.block_size
    micro_batch = settings.micro_batch
    accum = settings.batch_size // (micro_batch * proc.world_size)
    opt, scaler = make_optimizer(raw, settings.lr, settings.weight_decay, proc)
    step, last_val = resume_training(ckpt, opt, scaler)
    model = wrap_model(raw, args.compile, proc, T)
    log = MetricsLog(os.path.join(args.out_dir, "log.jsonl"), proc.master,
                     resume_step=step if ckpt is not None else None)
    clock = SaveClock(proc)
    stop = min(steps, args.stop_at or steps)
    # Ctrl-C, a non-finite loss or a failed write stops the run here; launch() says what is saved
    with tqdm(total=stop, initial=step, disable=not proc.master, desc="sft",
              dynamic_ncols=True) as bar:
        while step < stop:
            t0 = time.time()
            batch = [train_set[i] for i in batch_indices(step, len(train_set), settings.batch_size,
                                                         settings.seed).tolist()]
            n_targets = sum(sum(t != -1 for t in tgt) for _, tgt in batch)
            mine = batch[proc.rank::proc.world_size]
            if replay is not None:  # offsets are a function of the step, like the batch
                offsets = replay_offsets(step, len(replay) - T - 1, settings, accum, proc)
            losses = torch.zeros(2, device=proc.device)  # SFT loss, replay loss of this step
            for i in range(accum):
                x, y = collate(mine[i * micro_batch:(i + 1) * micro_batch], tok.pad_id,
                               proc.device)
                if proc.world_size > 1:  # all-reduce gradients only on the last micro-batch
                    model.require_backward_grad_sync = i == accum - 1
                with autocast(proc.device, proc.dtype):
                    # DDP averages gradients over processes; x world_size turns that into a sum
                    sft_loss = masked_loss_sum(model, x, y) * proc.world_size / n_targets
                    replay_loss = torch.zeros((), device=proc.device)
                    if replay is not None:  # plus the pretraining loss, as in pretrain.py
                        replay_loss = model(*lm_batch(replay, offsets[i], T, proc.device))[1]
                    replay_loss = replay_loss / accum
                scaler.scale(sft_loss + replay_loss).backward()
                losses += torch.stack([sft_loss.detach(), replay_loss.detach()])
            lr = lr_at(step, settings.lr, settings.warmup, steps)
            grad_norm = optimizer_step(opt, scaler, raw, lr, settings.grad_clip)
            loss, loss_replay = mean_over_processes(losses, proc).tolist()
            check_finite(step, loss=loss, replay_loss=loss_replay)
            step += 1
            tokens = sum(len(ids) for ids, _ in batch) + settings.replay * T  # real ones, no pad
            stats = dict(step=step, loss=round(loss, 4), replay_loss=round(loss_replay, 4), lr=lr,
                         grad_norm=round(grad_norm, 4), **throughput(
                             tokens, time.time() - t0, raw.flops_per_token(), proc))
            if step % settings.eval_every == 0 or step == stop:  # None: no held-out chat fits
                held_out = val_loss(raw, val_set, micro_batch, tok, proc)
                check_finite(step, held_out_loss=held_out)
                last_val = stats["val_loss"] = None if held_out is None else round(held_out, 4)
            log.write(**stats)  # before the checkpoint: a resume never lacks a logged step
            if clock.due("val_loss" in stats):
                check_weights(raw, x, step)
                if proc.master:
                    save_checkpoint(args.out_dir, "sft", raw, tok, config=asdict(settings),
                                    step=step, val_loss=last_val, optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict(), **checksums)
                clock.saved()
            bar.update(1)
            shown = ("loss", "val_loss", "tok_per_s") + ("replay_loss",) * (replay is not None)
            bar.set_postfix({k: stats[k] for k in shown if stats.get(k) is not None})
    return step, last_val


def final_evaluation(args, settings, model, tok, sizes, step, val, device):
    """eval.json: the held-out loss, and (on the bundled chats) the judged answers to what SFT
    never saw (evaluation.instruct_eval_sets: held-out entities in trained and new wordings,
    follow-ups, claims, requests out of scope), beside the base model's on the same requests."""
    result = {"stage": "sft", "preset": settings.preset, "steps": step, "val_loss": val, **sizes,
              "device": device, "weights_sha256": weights_digest(model)}  # see sft_greedy_figures
    if needs_base_eval(settings, args):
        t0 = time.time()
        result["eval_sets_sha256"] = eval_sets_digest(instruct_eval_sets())
        base, _, _ = load_checkpoint(settings.init_from, ["base"], device, flag="--init-from")
        audit = knowledge_audit(base, tok)  # which held-out facts SFT could state at best
        write_knowledge(args.out_dir, audit, settings.init_from)
        result["knowledge_audit"] = audit_summary(audit)
        result.update(evaluate_instruct(model, tok, known_map(audit)))
        result["base_on_same_prompts"] = evaluate_base_on_chat_prompts(
            base, tok, chats.eval_prompts("heldout"))
        result["code_as_chat"] = evaluate_code(model, tok, chat=True)  # the signatures, as chat
        result["eval_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out_dir, "eval.json"), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    for k, v in result.items():
        if isinstance(v, dict):
            print(k, json.dumps({m: x for m, x in v.items() if "examples" not in m}))


if __name__ == "__main__":
    main()
