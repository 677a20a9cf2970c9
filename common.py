"""What every stage shares: device and dtype choice, DDP set-up, checkpoints, metric logs, MFU.

Checkpoints are directories (out/base, out/sft, ...) holding `ckpt.pt` (weights, model config,
training state; loaded with weights_only=True, so never an arbitrary pickle) and the tokenizer
file the model was trained with. Every write goes to a temporary file first and is then renamed,
so a crash or Ctrl-C mid-write never leaves a half-written checkpoint behind.
"""
import argparse
import contextlib
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist

from data.tokenizer import Tokenizer
from model import GPT, GPTConfig

CKPT_FILE, TOKENIZER_FILE = "ckpt.pt", "tokenizer.json"


class UserError(Exception):
    """Bad input from the user: scripts print it as one line and exit with status 2."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- devices
def pick_device(name="auto"):
    if name == "auto":
        if torch.cuda.is_available():
            return "cuda"
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return "mps"
        return "cpu"
    return name


def pick_dtype(name, device):
    """bf16 where the GPU supports it, fp16 (with a GradScaler) on older GPUs, fp32 elsewhere."""
    if name == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    dtypes = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
              "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}
    if name not in dtypes:
        raise UserError(f"--dtype {name}: use auto, {', '.join(dtypes)}")
    return dtypes[name]


def autocast(device, dtype):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.split(":")[0], dtype=dtype)


def setup_distributed(device_arg):
    """Returns (rank, world_size, device). Started by torchrun -> one process per device joins a
    process group (NCCL on GPUs, gloo on CPU); started plainly -> a single process."""
    if "RANK" not in os.environ:
        return 0, 1, pick_device(device_arg)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
    device = pick_device(device_arg)
    if device == "cuda":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
    return rank, dist.get_world_size(), device


def launch(run, a):
    """Call run(a, rank, world_size, device, master) in this process (one of several under
    torchrun): bad input ends it with a one-line error, and the process group is always closed."""
    rank, world_size, device = setup_distributed(a.device)
    try:
        run(a, rank, world_size, device, rank == 0)
    except UserError as e:
        die(str(e))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model, compile_, world_size, device, block_size):
    """The model the training loop calls: optionally compiled, wrapped for DDP on several
    processes. Checkpoints and evaluation keep using the raw model."""
    model = maybe_compile(model, compile_,
                          torch.zeros(1, block_size, dtype=torch.long, device=device))
    if world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        model = DDP(model, device_ids=[int(device.split(":")[1])] if device.startswith("cuda")
                    else None)
    return model


def stop_run(e, out_dir):
    """Ctrl-C or a non-finite loss: exit, pointing at the last good checkpoint (never touched)."""
    where = os.path.join(out_dir, CKPT_FILE)
    why = "interrupted" if isinstance(e, KeyboardInterrupt) else str(e)
    sys.exit(f"stopped: {why}. The last good checkpoint is intact: {where}"
             + (" (--resume continues from it)" if os.path.exists(where) else ""))


def maybe_compile(model, enabled, example):
    """torch.compile is optional and fail-soft: if it cannot compile here, train uncompiled."""
    if not enabled:
        return model
    try:  # a forward and a backward pass, so that both graphs are compiled here
        compiled = torch.compile(model)
        compiled(example)[0].float().mean().backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure means "run eagerly"
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
              "continuing without it", file=sys.stderr)
        return model


# ----------------------------------------------------------------------------- optimisation
def make_optimizer(model, lr, weight_decay, device):
    """AdamW; weight decay on matrices (and embeddings) only, never on norm gains."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                             betas=(0.9, 0.95), fused=device.startswith("cuda"))


def lr_at(step, lr, warmup, steps):
    """Linear warmup to lr, then cosine decay to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def positive(kind):
    """argparse type: a number > 0."""
    def parse(text):
        value = kind(text)
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def nonnegative(text):
    """argparse type: a whole number >= 0."""
    if int(text) < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
    return int(text)


# bf16 dense tensor-core peak FLOP/s per GPU, for MFU. Matched by substring of the device name.
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
              ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


# ----------------------------------------------------------------------------- checkpoints
def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new, never half."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir, stage, model, tokenizer, **state):
    """Write out_dir/ckpt.pt: stage, model config + weights, tokenizer checksum, training state.
    out_dir/tokenizer.json is written once, when the run starts (see prepare_out_dir)."""
    atomic_write(os.path.join(out_dir, CKPT_FILE), lambda tmp: torch.save(
        dict(stage=stage, model_config=vars(model.config), model=model.state_dict(),
             tokenizer_checksum=tokenizer.checksum, **state), tmp))


def prepare_out_dir(out_dir, tokenizer, resume, write=True):
    """A fresh run never overwrites a checkpoint (that takes --resume, or deleting it) and
    starts with an empty log; the tokenizer is written next to where the weights will be.
    Every process checks, only one (write=True) writes."""
    ckpt = os.path.join(out_dir, CKPT_FILE)
    if not resume and os.path.exists(ckpt):
        raise UserError(f"{ckpt} exists: pass --resume to continue that run, or choose another "
                        "--out-dir (or delete it) to start a new one")
    if write and not resume:
        os.makedirs(out_dir, exist_ok=True)
        for stale in ("log.jsonl", "eval.json"):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))


def load_checkpoint(ckpt_dir, stages=None, device="cpu"):
    """Returns (model, tokenizer, ckpt dict). Clear errors for a missing directory, a checkpoint
    of the wrong stage, or a tokenizer that is missing or does not match the weights."""
    path = os.path.join(ckpt_dir, CKPT_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one first, or check --ckpt/--init-from)")
    try:  # on the CPU first: RNG states must stay there, the weights move below
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path}: not a readable checkpoint ({first})") from e
    if not isinstance(ckpt, dict) or not {"stage", "model", "model_config"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of this project (no stage/model/model_config)")
    if stages and ckpt["stage"] not in stages:
        raise UserError(f"{path} is a '{ckpt['stage']}' checkpoint; expected {' or '.join(stages)}")
    tok_path = os.path.join(ckpt_dir, TOKENIZER_FILE)
    if not os.path.isfile(tok_path):
        raise UserError(f"{ckpt_dir} has no {TOKENIZER_FILE}: the checkpoint cannot be decoded")
    try:
        tokenizer = Tokenizer.load(tok_path)
    except ValueError as e:
        raise UserError(str(e)) from e
    if tokenizer.checksum != ckpt.get("tokenizer_checksum"):
        raise UserError(f"{tok_path} does not match the tokenizer {path} was trained with")
    try:
        model = GPT(GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit the model config it records ({first})") from e
    return model.to(device), tokenizer, ckpt


# ----------------------------------------------------------------------------- logs
class MetricsLog:
    """Appends one JSON object per line to a .jsonl file (with wall-clock time). On resume,
    records after the checkpoint's step are dropped: those steps are about to be redone."""

    def __init__(self, path, enabled=True, resume_step=None):
        self.path, self.enabled = path, enabled
        if enabled and resume_step is not None and os.path.exists(path):
            with open(path) as f:
                kept = [line for line in f if json.loads(line).get("step", 0) <= resume_step]
            write_text(path, "".join(kept))

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")
