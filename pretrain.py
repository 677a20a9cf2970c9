"""Stage 1: pretrain the base model, a raw next-token predictor, from scratch.

The base model is the "library" that post-training turns into an assistant. It learns whatever
its corpus contains: here real prose (Shakespeare) and a generated world of encyclopedic passages,
quiz sheets and a few answer keys about countries, elements and US states (data/world.py). Asked
a question it does not answer: it continues the pattern, usually with more questions. It can be
"programmed" with few-shot examples. eval.json records exactly that.

    python pretrain.py                          # gpu preset on a CUDA device, else cpu
    python pretrain.py --preset tiny --out-dir out/tiny          # seconds, for a smoke test
    torchrun --nproc_per_node=2 pretrain.py --preset gpu         # DDP, one process per device
    python pretrain.py --resume                 # continue an interrupted run on the same curve
    python pretrain.py --init-from out/base --data data/cache/mytext --out-dir out/expert

Training: AdamW (weight decay on matrices only; or Muon for the layers' matrices), linear
warmup then cosine decay, gradient accumulation up to --batch-size sequences per step, gradient
clipping, bf16 autocast on GPUs.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from checkpoints import (TOKENIZER_FILE, MetricsLog, load_checkpoint, prepare_out_dir,
                         save_checkpoint)
from cli import check_paths_exist, launch, parse_stage_args, setting, start_or_resume
from data import prepare
from data.tokenizer import Tokenizer
from evaluation import audit_summary, evaluate_base, knowledge_audit, write_knowledge
from ground import UserError, choice, nonnegative, seed_arg, write_json
from model import GPT, GPTConfig
from training import (SAVE_EVERY_SECONDS, SaveClock, autocast, barrier, check_finite,
                      check_weights, lm_batch, lr_at, make_optimizer, mean_over_processes,
                      optimizer_step, resume_training, split_batch, throughput, wrap_model)


@dataclass
class Settings:
    """A pretraining run. The defaults are the cpu preset; checkpoints save these, and --resume
    continues with them."""
    # the model's shape (fixed once a run has started)
    n_layer: int = setting(4, "transformer blocks")
    n_head: int = setting(4, "attention heads; n_embd / n_head is the head size")
    n_kv_head: int = setting(4, "key/value heads; fewer than n_head is grouped-query attention")
    n_embd: int = setting(256, "width of the residual stream")
    block_size: int = setting(128, "context length in tokens")
    # optimisation
    steps: int = setting(1000, "optimizer steps in the whole schedule")
    batch_size: int = setting(32, "sequences per optimizer step, all processes together")
    micro_batch: int = setting(16, "sequences per forward pass per process; the rest of the "
                                   "batch is gradient accumulation (memory, not maths)")
    optimizer: str = setting("adamw", "adamw, or muon: Muon for the layers' weight matrices, "
                                      "AdamW for the rest, one learning rate (README: Speed)",
                             choice("adamw", "muon"))
    lr: float = setting(2e-3, "peak learning rate (a small model takes a large one)")
    warmup: int = setting(100, "linear warmup steps, then cosine decay to lr/10 (0: none); "
                               "Adam's first estimates are noisy", nonnegative(int))
    weight_decay: float = setting(0.1, "AdamW decay, on matrices and embeddings only",
                                  nonnegative(float))
    grad_clip: float = setting(1.0, "max gradient norm (0: no clipping): one odd batch cannot "
                                    "throw the model far", nonnegative(float))
    eval_every: int = setting(250, "steps between validation + checkpoint (a checkpoint also at "
                                   f"least every {SAVE_EVERY_SECONDS} s)")
    eval_iters: int = setting(10, "validation batches per evaluation, the same ones each time")
    seed: int = setting(1337, "initial weights and data order", seed_arg)
    data: str = setting(None, "prepared token folder (default: the bundled world, prepared on "
                              "first use; on --resume, the run's own)")
    preset: str = "cpu"  # the preset these settings started from (recorded, not a flag)


MODEL_FIELDS = ("n_layer", "n_head", "n_kv_head", "n_embd", "block_size")
PRESETS = {
    # a test finishes in seconds; the loss falls but the model knows nothing
    "tiny": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, block_size=128, batch_size=16,
                 micro_batch=16, steps=150, lr=3e-3, warmup=15, eval_every=75, eval_iters=4),
    # the whole pipeline on a 2-core laptop CPU: this stage about 12 minutes
    "cpu": dict(),  # the defaults above
    # one GPU, minutes. 600 steps of 65,536 tokens are about 10 passes over the world: 3,000
    # steps (53 passes) learnt it by heart, validation loss rising from step 500 (README)
    "gpu": dict(n_layer=8, n_head=8, n_kv_head=8, n_embd=512, block_size=512, batch_size=128,
                micro_batch=64, steps=600, lr=1.5e-3, warmup=60, eval_every=100, eval_iters=20),
}


def parse_args(argv=None):
    def own_flags(p):
        p.add_argument("--init-from", metavar="DIR",
                       help="start from this base checkpoint's weights (continued pretraining)")
        p.add_argument("--no-behaviour-eval", action="store_true",
                       help="skip the zero/few-shot evaluation at the end (eval.json: loss only)")
    return parse_stage_args(argv, __doc__, Settings, PRESETS, "out/base", own_flags)


def main(argv=None):
    launch(run, parse_args(argv))


def run(args, proc):
    settings, model, ckpt_tok, ckpt = start_or_resume(args, "base", Settings, PRESETS,
                                                      proc.device, source=args.init_from)
    check_settings(args, settings, ckpt)
    folder, train_data, val_data, meta, tok = load_data(settings.data, proc)
    if ckpt is not None and (ckpt["data_checksum"] != meta["data_checksum"]
                             or ckpt_tok.checksum != tok.checksum):
        raise UserError(f"{folder} does not hold the tokens the run in {args.out_dir} was trained "
                        f"on ({ckpt['config']['data'] or 'the bundled world'}, as prepared "
                        "then); pass that data as --data, or start a new run")
    if not args.init_from:  # before a model of that context is built
        check_tokens(folder, train_data, val_data, settings.block_size)
    model = model or new_model(args, settings, tok, folder, meta, proc.device)
    if args.init_from:  # the context is the loaded model's
        check_tokens(folder, train_data, val_data, settings.block_size)
    settings.micro_batch, accum = split_batch(settings.batch_size, settings.micro_batch, proc,
                                              "micro_batch" in args.given)
    prepare_out_dir(args.out_dir, tok, resume=args.resume, write=proc.master)  # all checked
    if proc.master:
        print(f"base model: {model.num_params(False) / 1e6:.2f}M parameters, "
              f"{settings.preset} preset, {proc.device} {str(proc.dtype).split('.')[-1]}, "
              f"{proc.world_size} process(es), {settings.batch_size}x{settings.block_size} "
              f"tokens/step, {accum} accumulation step(s)", file=sys.stderr)
    step, val = train(args, settings, model, tok, train_data, val_data, meta, proc, ckpt)
    if proc.master and step >= settings.steps:
        final_evaluation(args, settings, model, tok, meta, step, val, proc.device)


def check_settings(args, settings, ckpt):
    """A resumed run keeps its model's shape and asks for its data where it has moved."""
    if ckpt is None:
        return
    recorded = settings.data if "data" not in args.given else None
    check_paths_exist([("--data", recorded)], args.out_dir)
    saved = ckpt["config"]
    for k in MODEL_FIELDS:
        if getattr(settings, k) != saved[k]:
            raise UserError(f"--{k.replace('_', '-')} {getattr(settings, k)} differs from the "
                            f"checkpoint being resumed ({saved[k]})")


def check_tokens(folder, train_data, val_data, block_size):
    """Enough tokens in each split for one window of the context, or a one-line error."""
    for name, tokens, remedy in (("training", train_data, "more text"),
                                 ("validation", val_data, "a larger --val-fraction")):
        if len(tokens) <= block_size + 1:
            raise UserError(f"{folder}: {len(tokens)} {name} tokens are too few for a context "
                            f"of {block_size} ({remedy}, or a smaller --block-size)")


def load_data(data, proc):
    """(folder, train tokens, val tokens, meta.json, tokenizer) of a prepared folder; None is the
    bundled world, prepared (or brought up to date) on first use."""
    folder = data or prepare.DEFAULT_OUT
    if data is None and proc.master:
        prepare.refresh(folder)
    barrier(proc)
    try:  # load_tokens checks the folder against its meta.json, tokenizer included
        train_data, val_data, meta = prepare.load_tokens(folder, "train", "val")
        tok = Tokenizer.load(os.path.join(folder, "tokenizer.json"))
    except ValueError as e:
        raise UserError(str(e)) from e
    return folder, train_data, val_data, meta, tok


def new_model(args, settings, tok, folder, meta, device):
    """A fresh model of the settings' shape, or (--init-from) a base model to train further,
    which must share the data's tokenizer."""
    if not args.init_from:
        try:
            shape = {k: getattr(settings, k) for k in MODEL_FIELDS}
            config = GPTConfig(vocab_size=tok.n_vocab, **shape)
        except ValueError as e:
            raise UserError(f"model shape: {e} (--n-embd, --n-head, --n-kv-head, "
                            "--block-size)") from None
        torch.manual_seed(settings.seed)
        model = GPT(config).to(device)
        model.base_id = os.urandom(8).hex()  # a new base: its descendants carry this id
        return model
    model, model_tok, _ = load_checkpoint(args.init_from, ["base"], device, "--init-from")
    for k in MODEL_FIELDS:
        if k in args.given and args.given[k] != getattr(model.config, k):
            raise UserError(f"--{k.replace('_', '-')} {args.given[k]} differs from "
                            f"{args.init_from} ({getattr(model.config, k)})")
        setattr(settings, k, getattr(model.config, k))
    if model_tok.checksum != tok.checksum:
        new_dir = f"{folder.rstrip('/')}-{os.path.basename(os.path.normpath(args.init_from))}"
        again = prepare.command(new_dir, **{**meta["arguments"], "tokenizer": os.path.join(
            args.init_from, TOKENIZER_FILE)})
        raise UserError(f"{folder} was tokenized with another tokenizer than {args.init_from}'s; "
                        f"prepare its text with that one into a new folder, then pass --data "
                        f"{new_dir}: {again}")
    return model


@torch.no_grad()
def val_loss(model, data, settings, proc):
    """Mean loss over the same fixed validation batches every time, so evaluations compare."""
    model.eval()
    g = torch.Generator().manual_seed(0)
    losses = []
    for _ in range(settings.eval_iters):
        offsets = torch.randint(len(data) - settings.block_size - 1, (settings.micro_batch,),
                                generator=g)
        inputs, targets = lm_batch(data, offsets, settings.block_size, proc.device)
        with autocast(proc.device, proc.dtype):
            losses.append(model(inputs, targets)[1].item())
    model.train()
    return sum(losses) / len(losses)


def train(args, settings, raw, tok, train_data, val_data, meta, proc, ckpt):
    """The pretraining loop: next-token loss on random windows of the corpus, accumulated over
    micro-batches, one optimizer step, a validation loss and a checkpoint now and then.
    Returns (steps done, last validation loss)."""
    T = settings.block_size
    accum = settings.batch_size // (settings.micro_batch * proc.world_size)
    opt, scaler = make_optimizer(raw, settings.lr, settings.weight_decay, proc,
                                 muon=settings.optimizer == "muon")
    step, last_val = resume_training(ckpt, opt, scaler)
    data_rng = torch.Generator().manual_seed(settings.seed + 1)  # the same on every rank
    if ckpt is not None:
        data_rng.set_state(ckpt["data_rng"])
        torch.set_rng_state(ckpt["torch_rng"])
    model = wrap_model(raw, args.compile, proc, T)
    log = MetricsLog(os.path.join(args.out_dir, "log.jsonl"), proc.master,
                     resume_step=step if ckpt is not None else None)
    clock = SaveClock(proc)
    stop = min(settings.steps, args.stop_at or settings.steps)
    # Ctrl-C, a non-finite loss or a failed write stops the run here; launch() says what is saved
    with tqdm(total=stop, initial=step, disable=not proc.master, desc="pretrain",
              dynamic_ncols=True) as bar:
        while step < stop:
            t0 = time.time()
            offsets = torch.randint(len(train_data) - T - 1, (settings.batch_size,),
                                    generator=data_rng).view(accum, proc.world_size, -1)
            loss = torch.zeros((), device=proc.device)
            for i in range(accum):
                x, y = lm_batch(train_data, offsets[i, proc.rank], T, proc.device)
                if proc.world_size > 1:  # all-reduce gradients only on the last micro-batch
                    model.require_backward_grad_sync = i == accum - 1
                with autocast(proc.device, proc.dtype):
                    _, micro_loss = model(x, y)
                scaler.scale(micro_loss / accum).backward()
                loss += micro_loss.detach() / accum
            lr = lr_at(step, settings.lr, settings.warmup, settings.steps)
            grad_norm = optimizer_step(opt, scaler, raw, lr, settings.grad_clip)
            loss = mean_over_processes(loss, proc).item()
            check_finite(step, loss=loss)
            step += 1
            stats = dict(step=step, loss=round(loss, 4), lr=lr, grad_norm=round(grad_norm, 4),
                         **throughput(settings.batch_size * T, time.time() - t0,
                                      raw.flops_per_token(), proc))
            if step % settings.eval_every == 0 or step == stop:
                last_val = stats["val_loss"] = round(val_loss(raw, val_data, settings, proc), 4)
                check_finite(step, validation_loss=last_val)  # never overwrite a good checkpoint
            log.write(**stats)  # before the checkpoint: a resume never lacks a logged step
            if clock.due("val_loss" in stats):
                check_weights(raw, x, step)
                if proc.master:
                    save_checkpoint(args.out_dir, "base", raw, tok, config=asdict(settings),
                                    step=step, val_loss=last_val, optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict(), data_rng=data_rng.get_state(),
                                    torch_rng=torch.get_rng_state(),
                                    data_checksum=meta["data_checksum"])
                clock.saved()
            bar.update(1)
            bar.set_postfix({k: stats[k] for k in ("loss", "val_loss", "tok_per_s", "mfu")
                             if k in stats})
    return step, last_val


def final_evaluation(args, settings, model, tok, meta, step, val, device):
    """eval.json: the validation loss, and (on the bundled world) the evidence of a base model."""
    result = {"stage": "base", "preset": settings.preset, "steps": step, "val_loss": val,
              "params": model.num_params(False), "device": device}
    if meta["source"] == "world" and not args.no_behaviour_eval:
        t0 = time.time()
        result.update(evaluate_base(model, tok, device))
        audit = knowledge_audit(model, tok)  # which held-out facts it knows: SFT's ceiling
        result["knowledge_audit"] = audit_summary(audit)
        write_knowledge(args.out_dir, audit, args.out_dir)
        result["eval_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out_dir, "eval.json"), result)
    print(json.dumps({k: v for k, v in result.items() if not k.endswith("examples")}))


if __name__ == "__main__":
    main()
