"""What every stage shares: device and dtype choice, DDP set-up, checkpoints, metric logs, MFU.

Checkpoints are directories (out/base, out/sft, ...) holding `ckpt.pt` (weights, model config,
training state; loaded with weights_only=True, so never an arbitrary pickle) and the tokenizer
file the model was trained with. Every write goes to a temporary file first and is then renamed,
so a crash or Ctrl-C mid-write never leaves a half-written checkpoint behind.
"""
import contextlib
import json
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
    return {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16,
            "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16}[name]


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


def maybe_compile(model, enabled, example):
    """torch.compile is optional and fail-soft: if it cannot compile here, train uncompiled."""
    if not enabled:
        return model
    try:
        compiled = torch.compile(model)
        with torch.no_grad():
            compiled(example)
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure means "run eagerly"
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
              "continuing without it", file=sys.stderr)
        return model


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
def atomic_save(obj, path):
    tmp = f"{path}.tmp{os.getpid()}"
    torch.save(obj, tmp)
    os.replace(tmp, path)


def save_checkpoint(out_dir, stage, model, tokenizer, **state):
    """Write out_dir/ckpt.pt (stage, model config + weights, tokenizer checksum, training state)
    and out_dir/tokenizer.json. `model` may be wrapped by DDP or torch.compile."""
    os.makedirs(out_dir, exist_ok=True)
    raw = getattr(model, "module", model)
    raw = getattr(raw, "_orig_mod", raw)
    tok_path = os.path.join(out_dir, TOKENIZER_FILE)
    if not os.path.exists(tok_path) or Tokenizer.load(tok_path).checksum != tokenizer.checksum:
        tokenizer.save(tok_path)
    atomic_save(dict(stage=stage, model_config=vars(raw.config), model=raw.state_dict(),
                     tokenizer_checksum=tokenizer.checksum, **state),
                os.path.join(out_dir, CKPT_FILE))


def load_checkpoint(ckpt_dir, stages=None, device="cpu"):
    """Returns (model, tokenizer, ckpt dict). Clear errors for a missing directory, a checkpoint
    of the wrong stage, or a tokenizer that is missing or does not match the weights."""
    path = os.path.join(ckpt_dir, CKPT_FILE)
    if not os.path.isfile(path):
        raise UserError(f"no checkpoint at {path} (train one first, or check --ckpt/--init-from)")
    try:
        ckpt = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # noqa: BLE001
        raise UserError(f"{path}: not a readable checkpoint ({type(e).__name__}: {e})") from e
    if stages and ckpt.get("stage") not in stages:
        raise UserError(f"{path} is a '{ckpt.get('stage')}' checkpoint; expected "
                        f"{' or '.join(stages)}")
    tok_path = os.path.join(ckpt_dir, TOKENIZER_FILE)
    if not os.path.isfile(tok_path):
        raise UserError(f"{ckpt_dir} has no {TOKENIZER_FILE}: the checkpoint cannot be decoded")
    tokenizer = Tokenizer.load(tok_path)
    if tokenizer.checksum != ckpt["tokenizer_checksum"]:
        raise UserError(f"{tok_path} does not match the tokenizer {path} was trained with")
    model = GPT(GPTConfig(**ckpt["model_config"]))
    model.load_state_dict(ckpt["model"])
    return model.to(device), tokenizer, ckpt


# ----------------------------------------------------------------------------- logs
class MetricsLog:
    """Appends one JSON object per line to out_dir/<name>.jsonl (with wall-clock time)."""

    def __init__(self, path, enabled=True):
        self.path, self.enabled = path, enabled
        if enabled:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def write_json(path, obj):
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")
    os.replace(tmp, path)
