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
import pickle
import sys
import tempfile
import time
import warnings

import torch
import torch.distributed as dist

from data.tokenizer import Tokenizer
from model import GPT, GPTConfig

CKPT_FILE, TOKENIZER_FILE = "ckpt.pt", "tokenizer.json"
RESUME_FORMAT = 2  # the training state a checkpoint records; 2: data checksums, not paths
# Between evaluations a run still checkpoints this often, so that Ctrl-C or a crash never costs
# more than about a minute of training (the cpu preset's first evaluation is 3 minutes in).
SAVE_EVERY_SECONDS = 60


class UserError(Exception):
    """Bad input from the user: scripts print it as one line and exit with status 2."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


# ----------------------------------------------------------------------------- devices
def pick_device(name="auto"):
    """auto: cuda, then mps, then cpu. A named device must exist here: a one-line error if not."""
    mps = getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available()
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if mps else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in ("cpu", "cuda", "mps"):
        raise UserError(f"--device {name}: not a device this project runs on "
                        "(auto, cpu, cuda, cuda:N, mps)")
    if device.type == "cuda" and not torch.cuda.is_available():
        build = "" if torch.version.cuda else f" (torch {torch.__version__} is a CPU-only build)"
        raise UserError(f"--device {name}: no CUDA GPU is available here{build}")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s)")
    if device.type == "mps" and not mps:
        raise UserError(f"--device {name}: MPS (Apple GPU) is not available here")
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
    torchrun). However the run ends early, it ends with one line that says what is true: bad
    input (exit 2), or Ctrl-C, a non-finite loss or a failed write (exit 1, naming what was
    saved). The process group is always closed."""
    try:
        if not a.resume or os.path.isdir(a.out_dir):  # before any work, not after it
            writable_dir(a.out_dir, "--out-dir")
        rank, world_size, device = setup_distributed(a.device)
        run(a, rank, world_size, device, rank == 0)
    except UserError as e:
        die(str(e))
    except (KeyboardInterrupt, FloatingPointError, OSError) as e:
        stop_run(e, a.out_dir)
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
    """Exit after Ctrl-C, a non-finite loss or a failed write, saying what is on disk."""
    print(f"stopped: {stop_reason(e)}. {saved_state(out_dir, e)}", file=sys.stderr)
    sys.exit(1)


def stop_reason(e):
    """Ctrl-C, a failed write (naming the file) or a non-finite loss, in a few words."""
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    return str(e)


def saved_state(out_dir, e):
    ckpt = os.path.join(out_dir, CKPT_FILE)
    if not os.path.exists(ckpt):
        return (f"No checkpoint was saved in {out_dir} yet: there is nothing to resume, and the "
                "same command starts over")
    how = ("; the same settings diverge the same way: add a lower --lr, say"
           if isinstance(e, FloatingPointError) else "")
    return f"The last good checkpoint is intact: {ckpt} (--resume continues from it{how})"


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


@torch.no_grad()
def check_weights(model, x, step):
    """Before a checkpoint: the loss checked each step was computed before the update, so make
    sure the updated weights still give finite logits on `x`, or the checkpoint would be bad."""
    logits, _ = model(x)
    if not torch.isfinite(logits).all():
        raise FloatingPointError(f"the weights after step {step} give non-finite logits")


def positive(kind):
    """argparse type: a finite number > 0."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def nonnegative(kind):
    """argparse type: a finite number >= 0."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value
    return parse


def seed_arg(text):
    """argparse type: a seed torch accepts, with room for the offsets the stages add to it."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in 0 .. 2**32 - 1, got {text}")
    return value


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
def writable_dir(path, flag):
    """Create folder `path` if needed and prove that a file can be written in it, so that an
    unusable output path is a one-line error naming its flag before any work, never a traceback
    after it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new, never half.
    A failed write (disk full, say) leaves the old file as it was and raises the OSError, named
    after `path`; Ctrl-C during the write raises KeyboardInterrupt (torch.save turns both into a
    RuntimeError)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename, or a power cut could leave nothing
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, KeyboardInterrupt):
            raise KeyboardInterrupt from e
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def save_checkpoint(out_dir, stage, model, tokenizer, **state):
    """Write out_dir/ckpt.pt: stage, model config + weights, tokenizer checksum, training state.
    out_dir/tokenizer.json is written once, when the run starts (see prepare_out_dir)."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a Python file, so that a full disk raises an OSError
            torch.save(dict(stage=stage, model_config=vars(model.config),
                            model=model.state_dict(), tokenizer_checksum=tokenizer.checksum,
                            resume_format=RESUME_FORMAT, **state), f)
    atomic_write(os.path.join(out_dir, CKPT_FILE), write)


def check_out_dir(out_dir, resume, source=None):
    """A fresh run never overwrites a checkpoint (that takes --resume, or deleting it), nor
    writes into the folder of the model it starts from (source: its --init-from)."""
    if resume:
        return
    if source and os.path.realpath(source) == os.path.realpath(out_dir):
        raise UserError(f"--out-dir {out_dir}: the --init-from folder; the new model goes to a "
                        "folder of its own (choose another --out-dir)")
    ckpt = os.path.join(out_dir, CKPT_FILE)
    if os.path.exists(ckpt):
        raise UserError(f"{ckpt} exists: pass --resume to continue that run, or choose another "
                        "--out-dir (or delete it) to start a new one")


def prepare_out_dir(out_dir, tokenizer, resume, write=True):
    """A fresh run starts with an empty log, and the tokenizer is written next to where the
    weights will be (by one process: write=True)."""
    if write and not resume:
        for stale in ("log.jsonl", "eval.json"):
            if os.path.exists(os.path.join(out_dir, stale)):
                os.remove(os.path.join(out_dir, stale))
        tokenizer.save(os.path.join(out_dir, TOKENIZER_FILE))


def load_checkpoint(ckpt_dir, stages=None, device="cpu", flag="--ckpt"):
    """Returns (model, tokenizer, ckpt dict). Clear errors, naming `flag`, for a missing
    checkpoint, a file that is not one, a checkpoint of the wrong stage, or a tokenizer that is
    missing or does not match the weights. flag="--resume" reads out_dir of the run to continue."""
    if os.path.basename(ckpt_dir) == CKPT_FILE and os.path.isfile(ckpt_dir):
        ckpt_dir = os.path.dirname(ckpt_dir)  # the file was named instead of its folder
    path = os.path.join(ckpt_dir, CKPT_FILE)
    if not os.path.isfile(path):
        if flag == "--resume":
            raise UserError(f"--resume: no checkpoint in {ckpt_dir} to continue (check --out-dir, "
                            "or start the run without --resume)")
        raise UserError(f"{flag} {ckpt_dir}: no checkpoint there ({CKPT_FILE} is missing)")
    try:  # on the CPU first: RNG states must stay there, the weights move below
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch's notes on pickle protocols: not for users
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    except Exception as e:  # noqa: BLE001 - torch's own advice here would be to load unsafely
        with open(path, "rb") as f:
            is_zip = f.read(4) == b"PK\x03\x04"  # what torch.save writes
        if not is_zip:
            why = "not a PyTorch file: a Git LFS pointer or a download error page, perhaps"
        elif isinstance(e, pickle.UnpicklingError):
            why = "it holds Python objects that are not tensors, and is never unpickled"
        else:
            why = "a damaged PyTorch file, cut short perhaps"
        raise UserError(f"{path} is not a checkpoint of this project ({why})") from None
    if not isinstance(ckpt, dict) or not {"stage", "model", "model_config"} <= ckpt.keys():
        raise UserError(f"{path} is not a checkpoint of this project (no stage/model/model_config)")
    if stages and ckpt["stage"] not in stages:
        raise UserError(f"{path} is a '{ckpt['stage']}' checkpoint; expected {' or '.join(stages)}")
    if flag == "--resume" and ckpt.get("resume_format") != RESUME_FORMAT:
        raise UserError(f"{path} was saved by an older version of this project: its weights load "
                        "(--init-from, sample.py), but its run cannot be resumed")
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
                kept = [line for line in f if logged_step(line) <= resume_step]
            write_text(path, "".join(kept))

    def write(self, **record):
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def logged_step(line):
    """The step of a log line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")
