"""Stage 1: pretrain the base model, a raw next-token predictor, from scratch.

The base model is the "library" that post-training turns into an assistant. It learns whatever
its corpus contains: here real prose (Shakespeare) and a generated world of encyclopedic passages,
quiz sheets and a few answer keys about countries, elements and US states (data/world.py). Asked
a question it does not answer: it continues the pattern, usually with more questions. It can be
"programmed" with few-shot examples. eval.json records exactly that.

    python pretrain.py                          # preset for this machine (gpu or cpu)
    python pretrain.py --preset tiny --out-dir out/tiny          # seconds, for a smoke test
    torchrun --nproc_per_node=2 pretrain.py --preset gpu         # DDP, one process per device
    python pretrain.py --resume                 # continue an interrupted run on the same curve
    python pretrain.py --init-from out/base --data data/cache/mytext --out-dir out/expert

Training: AdamW (weight decay on matrices only), linear warmup then cosine decay, gradient
accumulation up to --batch-size sequences per step, gradient clipping, bf16 autocast on GPUs.
"""
import argparse
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from common import (SAVE_EVERY_SECONDS, TOKENIZER_FILE, UserError, MetricsLog, autocast,
                    check_out_dir, check_weights, launch, load_checkpoint, lr_at,
                    make_optimizer, nonnegative, peak_flops, pick_dtype, positive,
                    prepare_out_dir, save_checkpoint, seed_arg, wrap_model, write_json)
from data import prepare, world
from data.tokenizer import Tokenizer
from model import GPT, GPTConfig

MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
PRESETS = {
    # a test finishes in seconds; the loss falls but the model knows nothing
    "tiny": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, block_size=128, batch_size=16,
                 micro_batch=16, steps=150, lr=3e-3, warmup=15, eval_every=75, eval_iters=4),
    # the whole pipeline on a 2-core laptop CPU: this stage about 12 minutes
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, block_size=128, batch_size=32,
                micro_batch=16, steps=1000, lr=2e-3, warmup=100, eval_every=250, eval_iters=10),
    # one GPU, minutes
    "gpu": dict(n_layer=8, n_head=8, n_kv_head=8, n_embd=512, block_size=512, batch_size=128,
                micro_batch=64, steps=3000, lr=1.5e-3, warmup=200, eval_every=500, eval_iters=20),
}
CONFIG_KEYS = set(PRESETS["cpu"]) | {"seed", "weight_decay", "grad_clip", "data"}


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *PRESETS], default="auto",
                   help="size of model and run; auto = gpu on CUDA, else cpu. Any field below "
                        "overrides the preset's value")
    p.add_argument("--data", help="prepared token folder (default: the bundled world, prepared "
                   "on first use; on --resume, the run's own)")
    p.add_argument("--out-dir", default="out/base", help="checkpoint folder (default: out/base)")
    p.add_argument("--init-from", metavar="DIR",
                   help="start from this checkpoint's weights (continued pretraining)")
    p.add_argument("--resume", action="store_true",
                   help="continue the run in --out-dir: model, optimizer, step, RNG, data position")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fail-soft)")
    p.add_argument("--seed", type=seed_arg, default=None,
                   help="init and data order (default 1337)")
    g = p.add_argument_group("model (defaults from the preset)")
    for f in MODEL_FIELDS:
        g.add_argument("--" + f.replace("_", "-"), type=positive(int))
    g = p.add_argument_group("optimisation (defaults from the preset)")
    g.add_argument("--steps", type=positive(int), help="optimizer steps in the whole schedule")
    g.add_argument("--batch-size", type=positive(int), help="sequences per optimizer step, all processes")
    g.add_argument("--micro-batch", type=positive(int),
                   help="sequences per forward pass per process; the rest is accumulation")
    g.add_argument("--lr", type=positive(float), help="peak learning rate (cosine decay to lr/10)")
    g.add_argument("--warmup", type=nonnegative(int), help="linear warmup steps (0: none)")
    g.add_argument("--weight-decay", type=nonnegative(float), default=None, help="default 0.1")
    g.add_argument("--grad-clip", type=nonnegative(float), default=None,
                   help="max grad norm (default 1.0; 0 = no clipping)")
    g.add_argument("--eval-every", type=positive(int),
                   help=f"steps between validation + checkpoint (a checkpoint also at least "
                        f"every {SAVE_EVERY_SECONDS} s)")
    g.add_argument("--eval-iters", type=positive(int), help="validation batches per evaluation")
    g.add_argument("--stop-at", type=positive(int), default=None,
                   help="stop after this step as if interrupted (the schedule still spans "
                        "--steps); --resume continues")
    g.add_argument("--no-behaviour-eval", action="store_true",
                   help="skip the zero/few-shot evaluation at the end (eval.json: loss only)")
    return p.parse_args(argv)


def resolve_config(a, saved=None):
    """Preset values, overridden by flags given on the command line. On --resume the saved run's
    config is the base instead, and the model's shape cannot change."""
    given = {k: v for k, v in vars(a).items() if v is not None and k in CONFIG_KEYS}
    if saved is not None:
        if a.preset not in ("auto", saved["preset"]):
            raise UserError(f"--preset {a.preset}: the run being resumed is a '{saved['preset']}' "
                            "run; a resumed run keeps its settings (drop --preset)")
        if "data" not in given and saved["data"] and not os.path.exists(saved["data"]):
            raise UserError(f"--data {saved['data']}: not found; the run being resumed needs it: "
                            "pass --data with where it is now")
        for k in MODEL_FIELDS:
            if k in given and given[k] != saved[k]:
                raise UserError(f"--{k.replace('_', '-')} {given[k]} differs from the checkpoint "
                                f"being resumed ({saved[k]})")
        return {**saved, **given}
    preset = a.preset if a.preset != "auto" else ("gpu" if torch.cuda.is_available() else "cpu")
    return {**PRESETS[preset], "preset": preset, "seed": 1337, "weight_decay": 0.1,
            "grad_clip": 1.0, "data": None, **given}  # data None: the bundled world



def batch(data, offsets, T, device):
    x = torch.stack([torch.from_numpy(data[o:o + T + 1].astype("int64")) for o in offsets.tolist()])
    x = x.to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]


@torch.no_grad()
def val_loss(model, data, c, device, dtype):
    """Mean loss over the same fixed validation batches every time, so evaluations compare."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(c["eval_iters"]):
        x, y = batch(data, torch.randint(len(data) - c["block_size"] - 1, (c["micro_batch"],),
                                         generator=g), c["block_size"], device)
        with autocast(device, dtype):
            losses.append(model(x, y)[1].item())
    model.train()
    return sum(losses) / len(losses)


@torch.no_grad()
def evaluate_base(model, tok, device, seed=0, n_zero_shot=100, batch_size=64):
    """The evidence that this is a base model (see README): does a bare question get continued
    with more questions, and does a few-shot Q/A prompt get the right answer?"""
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
    model.train()
    return result


def main(argv=None):
    launch(run, parse_args(argv))


def load_data(data, world_size, master):
    """(folder, train tokens, val tokens, meta.json, tokenizer) of a prepared folder; None is the
    bundled world, prepared (or brought up to date) on first use."""
    folder = data or prepare.DEFAULT_OUT
    if data is None and master:
        prepare.refresh(folder)
    if world_size > 1:
        dist.barrier()
    try:  # load_tokens checks the folder against its meta.json, tokenizer included
        train_data, val_data, meta = prepare.load_tokens(folder, "train", "val")
        tok = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    except ValueError as e:
        raise UserError(str(e)) from e
    return folder, train_data, val_data, meta, tok


def run(a, rank, world_size, device, master):
    # --- settings (preset and flags, or the run being resumed), then the data
    ckpt = None
    if a.resume:
        model, ckpt_tok, ckpt = load_checkpoint(a.out_dir, ["base"], device, flag="--resume")
        c = resolve_config(a, ckpt["config"])
    else:
        c = resolve_config(a)
        check_out_dir(a.out_dir, resume=False, source=a.init_from)
    folder, train_data, val_data, meta, tok = load_data(c["data"], world_size, master)
    if ckpt is not None and ckpt["data_checksum"] != meta["data_checksum"]:
        raise UserError(f"{folder} does not hold the tokens the run in {a.out_dir} was trained "
                        f"on ({ckpt['config']['data'] or 'the bundled world'}, as prepared then); "
                        "pass that data as --data, or start a new run")

    # --- model: fresh, from another checkpoint, or resumed
    if ckpt is None and a.init_from:
        model, ckpt_tok, _ = load_checkpoint(a.init_from, ["base"], device, "--init-from")
        for k in MODEL_FIELDS:
            if getattr(a, k) is not None and getattr(a, k) != getattr(model.config, k):
                raise UserError(f"--{k.replace('_', '-')} {getattr(a, k)} differs from "
                                f"{a.init_from} ({getattr(model.config, k)})")
        c.update({k: getattr(model.config, k) for k in MODEL_FIELDS})
    elif ckpt is None:
        try:
            config = GPTConfig(vocab_size=tok.n_vocab, **{k: c[k] for k in MODEL_FIELDS})
        except ValueError as e:
            raise UserError(f"model shape: {e} (--n-embd, --n-head, --n-kv-head, "
                            "--block-size)") from None
        torch.manual_seed(c["seed"])
        ckpt_tok = tok
        model = GPT(config).to(device)
    if ckpt_tok.checksum != tok.checksum:  # a model (--init-from) with another tokenizer
        source = a.init_from or a.out_dir
        new_dir = f"{folder.rstrip('/')}-{os.path.basename(os.path.normpath(source))}"
        again = prepare.command(new_dir, **{**meta["arguments"], "tokenizer": os.path.join(
            source, TOKENIZER_FILE)})
        raise UserError(f"{folder} was tokenized with another tokenizer than {source}'s; "
                        f"prepare its text with that one into a new folder, then pass --data "
                        f"{new_dir}: {again}")
    prepare_out_dir(a.out_dir, tok, resume=ckpt is not None, write=master)
    if a.micro_batch is None:  # the preset's micro-batch, split over the processes
        c["micro_batch"] = max(1, min(c["micro_batch"], c["batch_size"] // world_size))
    per_step = c["micro_batch"] * world_size
    if c["batch_size"] % per_step:
        raise UserError(f"--batch-size {c['batch_size']} must be a multiple of --micro-batch x "
                        f"processes = {per_step}")
    accum = c["batch_size"] // per_step
    T = c["block_size"]
    for name, tokens, remedy in (("training", train_data, "more text"), ("validation", val_data,
                                                                       "a larger --val-fraction")):
        if len(tokens) <= T + 1:
            raise UserError(f"{folder}: {len(tokens)} {name} tokens are too few for a context of "
                            f"{T} ({remedy}, or a smaller --block-size)")

    dtype = pick_dtype(a.dtype, device)
    dev_type = device.split(":")[0]
    if dev_type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    opt = make_optimizer(model, c["lr"], c["weight_decay"], device)
    scaler = torch.amp.GradScaler(dev_type, enabled=dtype == torch.float16)
    data_rng = torch.Generator().manual_seed(c["seed"] + 1)  # the same on every rank
    step, last_val = 0, None
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        data_rng.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
        step, last_val = ckpt["step"], ckpt.get("val_loss")
    raw = model
    model = wrap_model(model, a.compile, world_size, device, T)
    log = MetricsLog(os.path.join(a.out_dir, "log.jsonl"), enabled=master,
                     resume_step=step if ckpt is not None else None)
    flops_per_step = raw.flops_per_token() * c["batch_size"] * T
    peak = peak_flops(device)

    def checkpoint(loss):
        if master:
            save_checkpoint(a.out_dir, "base", raw, tok, config=c, step=step, val_loss=loss,
                            optimizer=opt.state_dict(), scaler=scaler.state_dict(),
                            data_rng=data_rng.get_state(),
                            torch_rng=torch.get_rng_state(), data_checksum=meta["data_checksum"])

    if master:
        print(f"base model: {raw.num_params(False) / 1e6:.2f}M parameters, {c['preset']} preset, "
              f"{device} {str(dtype).split('.')[-1]}, {world_size} process(es), "
              f"{c['batch_size']}x{T} tokens/step, {accum} accumulation step(s)", file=sys.stderr)
    stop = min(c["steps"], a.stop_at or c["steps"])
    model.train()
    last_save = time.time()
    # Ctrl-C, a non-finite loss or a failed write stops the run here; launch() says what is saved
    with tqdm(total=stop, initial=step, disable=not master, desc="pretrain",
              dynamic_ncols=True) as bar:
        while step < stop:
            t0 = time.time()
            lr = lr_at(step, c["lr"], c["warmup"], c["steps"])
            for group in opt.param_groups:
                group["lr"] = lr
            offsets = torch.randint(len(train_data) - T - 1, (c["batch_size"],),
                                    generator=data_rng).view(accum, world_size, -1)[:, rank]
            total = torch.zeros((), device=device)
            for i in range(accum):
                x, y = batch(train_data, offsets[i], T, device)
                if world_size > 1:  # all-reduce gradients only on the last micro-batch
                    model.require_backward_grad_sync = i == accum - 1
                with autocast(device, dtype):
                    _, loss = model(x, y)
                scaler.scale(loss / accum).backward()
                total += loss.detach() / accum
            scaler.unscale_(opt)
            if c["grad_clip"] > 0:  # 0 means no clipping, as in nanoGPT
                torch.nn.utils.clip_grad_norm_(raw.parameters(), c["grad_clip"])
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            if world_size > 1:
                dist.all_reduce(total, op=dist.ReduceOp.AVG)
            loss = total.item()
            if not math.isfinite(loss):
                raise FloatingPointError(f"loss is {loss} at step {step}")
            step += 1
            dt = time.time() - t0  # the step itself; evaluation and checkpointing come after
            stats = dict(step=step, loss=round(loss, 4), lr=lr, tok_per_s=round(c["batch_size"] * T / dt))
            if peak:
                stats["mfu"] = round(flops_per_step / dt / (peak * world_size), 4)
            if step % c["eval_every"] == 0 or step == stop:
                stats["val_loss"] = round(val_loss(raw, val_data, c, device, dtype), 4)
                if not math.isfinite(stats["val_loss"]):  # never overwrite a good checkpoint
                    raise FloatingPointError(f"validation loss is {stats['val_loss']} at step {step}")
                last_val = stats["val_loss"]
            log.write(**stats)  # before the checkpoint: a resume never lacks a logged step
            if "val_loss" in stats or time.time() - last_save > SAVE_EVERY_SECONDS:
                check_weights(raw, x, step)
                checkpoint(last_val)
                last_save = time.time()
            bar.update(1)
            bar.set_postfix({k: stats[k] for k in ("loss", "val_loss", "tok_per_s", "mfu")
                             if k in stats})
    if not master or step < c["steps"]:
        return
    result = {"stage": "base", "preset": c["preset"], "steps": step, "val_loss": last_val,
              "params": raw.num_params(False), "device": device}
    if meta["source"] == "world" and not a.no_behaviour_eval:
        t0 = time.time()
        result.update(evaluate_base(raw, tok, device))
        result["eval_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(a.out_dir, "eval.json"), result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("examples")}))


if __name__ == "__main__":
    main()
