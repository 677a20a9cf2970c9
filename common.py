"""What every stage shares, so that each stage file keeps only its own lesson (its loop).

- settings: each stage declares its Settings dataclass (a default and a line of why per field)
  and named presets; `parse_stage_args` turns them into flags whose --help shows the real
  default for the chosen preset, and `resolve_settings` merges preset, flags and a resumed run.
- processes: device and dtype choice, DDP set-up, `launch` (one true line however a run ends).
- training plumbing: the optimizer (AdamW, weight decay split, fused where supported), the
  learning-rate schedule, `optimizer_step` (unscale, clip, step, update, zero; returns the
  gradient norm), the micro-batch split over processes, tokens/s and MFU, checks for NaN.
- checkpoints and logs.

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
import subprocess
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass, field, fields
from functools import lru_cache

import torch
import torch.distributed as dist

from data.tokenizer import Tokenizer
from model import GPT, GPTConfig, LikelihoodRewardGPT, ScalarHeadGPT

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


def run_or_die(run, args):
    """run(args), where a UserError ends the command with its one line (the experiments)."""
    try:
        run(args)
    except UserError as e:
        die(str(e))


# ----------------------------------------------------------------------------- settings
def setting(default, why, parse=None):
    """A field of a stage's Settings: its default, one line of why (the flag's --help), and how
    the flag is parsed (default: a positive number of the field's type, or text)."""
    return field(default=default, metadata={"why": why, "parse": parse})


def preset_for(device):
    """The preset the `auto` preset means on this device: gpu on a CUDA GPU, cpu elsewhere."""
    return "gpu" if device.startswith("cuda") else "cpu"


def parse_stage_args(argv, doc, settings_cls, presets, out_dir, add_flags=None):
    """The command line of a training stage: the run flags every stage shares, its own
    (add_flags(parser)), and one flag per field of its Settings. A settings flag that is not
    given is left out of the namespace (a.given holds those that are), so that a resumed run
    keeps its own values; --help shows each default as the chosen preset sets it."""
    pre = argparse.ArgumentParser(add_help=False, exit_on_error=False)
    pre.add_argument("--preset", default="auto")
    pre.add_argument("--device", default="auto")
    try:
        known, _ = pre.parse_known_args(argv)
        shown = known.preset if known.preset in presets else preset_for(pick_device(known.device))
    except (argparse.ArgumentError, UserError):
        shown = "cpu"  # the full parser, or the run itself, reports the mistake
    defaults = {**asdict(settings_cls()), **presets[shown]}
    p = argparse.ArgumentParser(description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *presets], default="auto",
                   help="named values for the settings below (flags override them); auto: gpu "
                        "on a CUDA device, else cpu")
    p.add_argument("--out-dir", default=out_dir, help=f"checkpoint folder (default: {out_dir})")
    p.add_argument("--resume", action="store_true", help="continue the run in --out-dir "
                   "(model, optimizer, step, RNG, data position) with its saved settings; a "
                   "setting given as a flag replaces the saved one (the model's shape cannot)")
    p.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu) | cpu | "
                   "cuda | cuda:N | mps")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on GPUs that have it, else fp16 "
                   "with a GradScaler; fp32 on CPU) | float32 | bfloat16 | float16")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (fail-soft)")
    p.add_argument("--stop-at", type=positive(int), help="stop after this step as if "
                   "interrupted (the schedule still spans the whole run); --resume continues")
    if add_flags:
        add_flags(p)
    group = p.add_argument_group(f"settings (defaults shown: the {shown} preset)")
    for f in fields(settings_cls):
        if "why" in f.metadata:
            kind = {"int": int, "float": float}.get(f.type if isinstance(f.type, str)
                                                    else f.type.__name__)
            parse = f.metadata["parse"] or (positive(kind) if kind else str)
            why = f.metadata["why"].replace("%", "%%")  # argparse reads % as a format
            group.add_argument("--" + f.name.replace("_", "-"), type=parse,
                               default=argparse.SUPPRESS,
                               help=why if defaults[f.name] is None else
                               f"{why} (default: {defaults[f.name]})")
    a = p.parse_args(argv)
    a.given = {f.name: vars(a)[f.name] for f in fields(settings_cls)
               if "why" in f.metadata and f.name in vars(a)}
    return a


def resolve_settings(settings_cls, presets, a, device, saved=None):
    """A new run: the dataclass defaults, then the preset, then the flags given. A resumed run:
    its saved settings, then the flags given (it cannot switch preset)."""
    if saved is None:
        preset = a.preset if a.preset != "auto" else preset_for(device)
        values = {**presets[preset], "preset": preset, **a.given}
    else:
        if a.preset not in ("auto", saved["preset"]):
            raise UserError(f"--preset {a.preset}: the run being resumed is a "
                            f"'{saved['preset']}' run; a resumed run keeps its settings "
                            "(drop --preset)")
        names = {f.name for f in fields(settings_cls)}
        values = {**{k: v for k, v in saved.items() if k in names}, **a.given}
    return settings_cls(**values)


def check_paths_exist(needed, out_dir):
    """On --resume: a path the run recorded that is gone (the project moved) is asked for by
    its flag. needed: (flag, path or None) pairs."""
    for flag, path in needed:
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found; the run in {out_dir} needs it: pass "
                            f"{flag} with where it is now")


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


def choice(*options):
    """argparse type: one of the options."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(options)}, got {text}")
        return text
    return parse


def seed_arg(text):
    """argparse type: a seed torch accepts, with room for the offsets the stages add to it."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in 0 .. 2**32 - 1, got {text}")
    return value


# ----------------------------------------------------------------------------- processes
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


@dataclass
class Process:
    """Where this process trains: its rank among world_size processes (1 without torchrun),
    its device and the dtype of its autocast. The master (rank 0) writes files and logs."""
    rank: int
    world_size: int
    device: str
    dtype: torch.dtype

    @property
    def master(self):
        return self.rank == 0


def setup_process(device_arg, dtype_arg):
    """Started by torchrun -> one process per device joins a process group (NCCL on GPUs, gloo
    on CPU); started plainly -> a single process. TF32 matmuls on CUDA (fp32 work that autocast
    leaves, at tensor-core speed and 10 bits of mantissa)."""
    rank, world_size, device = 0, 1, pick_device(device_arg)
    if "RANK" in os.environ:
        rank, local_rank = int(os.environ["RANK"]), int(os.environ["LOCAL_RANK"])
        if device == "cuda":
            device = f"cuda:{local_rank}"
            torch.cuda.set_device(device)
        dist.init_process_group("nccl" if device.startswith("cuda") else "gloo")
        world_size = dist.get_world_size()
    if device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    return Process(rank, world_size, device, pick_dtype(dtype_arg, device))


def launch(run, a):
    """Call run(a, process) in this process (one of several under torchrun). However the run
    ends early, it ends with one line that says what is true: bad input (exit 2), or Ctrl-C, a
    non-finite loss or a failed write (exit 1, naming what was saved). The process group is
    always closed."""
    try:
        if not a.resume or os.path.isdir(a.out_dir):  # before any work, not after it
            writable_dir(a.out_dir, "--out-dir")
        run(a, setup_process(a.device, a.dtype))
    except UserError as e:
        die(str(e))
    except (KeyboardInterrupt, FloatingPointError, OSError) as e:
        stop_run(e, a.out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def wrap_model(model, compile_, proc, block_size):
    """The model the training loop calls: optionally compiled, wrapped for DDP on several
    processes. Checkpoints and evaluation keep using the raw model."""
    model = maybe_compile(model, compile_,
                          torch.zeros(1, block_size, dtype=torch.long, device=proc.device))
    if proc.world_size > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        device_ids = [int(proc.device.split(":")[1])] if proc.device.startswith("cuda") else None
        model = DDP(model, device_ids=device_ids)
    return model


def mean_over_processes(values, proc):
    """The mean of a tensor over all processes (itself with one; all-reduced in place with
    several): every rank logs the same."""
    if proc.world_size > 1:
        dist.all_reduce(values)
        values = values / proc.world_size
    return values


def gather_lists(rows, proc):
    """Every process's list, joined in rank order (the list itself with one process)."""
    if proc.world_size == 1:
        return rows
    parts = [None] * proc.world_size
    dist.all_gather_object(parts, rows)
    return [row for part in parts for row in part]


def barrier(proc):
    if proc.world_size > 1:
        dist.barrier()


def run_stage(script, out_dir, device, *args):
    """For the experiments: run a stage script as its own process (python SCRIPT --out-dir OUT_DIR
    --device DEVICE ARGS), skipped when OUT_DIR/eval.json says it finished, resumed from a
    checkpoint left there."""
    if os.path.exists(os.path.join(out_dir, "eval.json")):
        print(f"{out_dir} is complete (delete it to run again)")
        return
    again = os.path.exists(os.path.join(out_dir, CKPT_FILE))
    command = [sys.executable, os.path.join(os.path.dirname(os.path.abspath(__file__)), script),
               "--out-dir", out_dir, "--device", device, *(["--resume"] if again else args)]
    print("$", " ".join(command), flush=True)
    if subprocess.run(command).returncode:
        raise UserError(f"{script} stopped (its message is above); the same command resumes it")


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
        output = compiled(example)
        (output[0] if isinstance(output, tuple) else output).float().mean().backward()
        model.zero_grad(set_to_none=True)
        return compiled
    except Exception as e:  # noqa: BLE001 - any compiler failure means "run eagerly"
        print(f"warning: torch.compile failed ({type(e).__name__}: {str(e)[:200]}); "
              "continuing without it", file=sys.stderr)
        return model


# ----------------------------------------------------------------------------- training steps
def make_optimizer(model, lr, weight_decay, proc, fused=None):
    """AdamW with weight decay on matrices (and embeddings) only, never on norm gains; and the
    GradScaler that fp16 needs (disabled otherwise). fused=None: the fused kernel on CUDA."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.95),
                            fused=proc.device.startswith("cuda") if fused is None else fused)
    scaler = torch.amp.GradScaler(proc.device.split(":")[0],
                                  enabled=proc.dtype == torch.float16)
    return opt, scaler


def resume_training(ckpt, opt, scaler):
    """(step, last validation loss) to start from: 0 and None for a new run; for a resumed one
    (ckpt: its checkpoint) its own, with the optimizer's moments and the loss scale restored."""
    if ckpt is None:
        return 0, None
    opt.load_state_dict(ckpt["optimizer"])
    if ckpt["scaler"] and scaler.is_enabled():  # a run saved without fp16 has no loss scale yet
        scaler.load_state_dict(ckpt["scaler"])
    return ckpt["step"], ckpt.get("val_loss")


def lr_at(step, lr, warmup, steps):
    """Linear warmup to lr, then cosine decay to lr/10 at the last step."""
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, steps - warmup))
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def optimizer_step(opt, scaler, model, lr, grad_clip):
    """Set the learning rate, unscale the gradients (fp16), clip them to norm grad_clip (0: no
    clipping), step, update the loss scale, zero the gradients. Returns the gradient norm before
    clipping (inf or nan when fp16 overflowed: the scaler then skips the step)."""
    for group in opt.param_groups:
        group["lr"] = lr
    scaler.unscale_(opt)
    # an infinite limit clips nothing (the gradients are multiplied by 1.0) but gives the norm
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                          grad_clip if grad_clip > 0 else math.inf)
    scaler.step(opt)
    scaler.update()
    opt.zero_grad(set_to_none=True)
    return norm.item()


def split_batch(batch_size, micro_batch, proc, micro_batch_given):
    """(micro-batch per process, accumulation steps) for batch_size examples a step. A preset's
    micro-batch is shrunk to fit the share of each process; one given by flag is kept."""
    if not micro_batch_given:
        micro_batch = max(1, min(micro_batch, batch_size // proc.world_size))
    per_step = micro_batch * proc.world_size
    if batch_size % per_step:
        raise UserError(f"--batch-size {batch_size} must be a multiple of --micro-batch x "
                        f"processes = {per_step}")
    return micro_batch, batch_size // per_step


def batch_indices(step, n, batch_size, seed):
    """The examples of optimizer step `step`: epoch e is a fresh permutation seeded by (seed, e).
    A pure function of the step, so --resume needs nothing but the step count."""
    epoch, i = divmod(step, n // batch_size)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000 + epoch))
    return perm[i * batch_size:(i + 1) * batch_size]


def lm_batch(tokens, offsets, T, device):
    """Inputs and next-token targets (B, T) from windows of T + 1 tokens at `offsets`."""
    x = torch.stack([torch.from_numpy(tokens[o:o + T + 1].astype("int64"))
                     for o in offsets.tolist()])
    x = x.to(device, non_blocking=True)
    return x[:, :-1], x[:, 1:]


def check_finite(step, **values):
    """Stop (FloatingPointError) on a NaN or infinite loss, before it reaches a checkpoint."""
    for name, value in values.items():
        if value is not None and not math.isfinite(value):
            raise FloatingPointError(f"{name.replace('_', ' ')} is {value} at step {step}")


@torch.no_grad()
def check_weights(model, x, step):
    """Before a checkpoint: the loss checked each step was computed before the update, so make
    sure the updated weights still give finite logits on `x`, or the checkpoint would be bad."""
    output = model(x)  # (logits, loss) of a language model, the scores of a scalar head
    if not torch.isfinite(output[0] if isinstance(output, tuple) else output).all():
        raise FloatingPointError(f"the weights after step {step} give non-finite logits")


class SaveClock:
    """A checkpoint at every evaluation, and between them at least every SAVE_EVERY_SECONDS.
    Rank 0's clock decides for every process, so that all of them check the weights together."""

    def __init__(self, proc):
        self.proc, self.last = proc, time.time()

    def due(self, evaluated):
        due = torch.tensor(int(evaluated or time.time() - self.last > SAVE_EVERY_SECONDS))
        if self.proc.world_size > 1:
            due = due.to(self.proc.device)
            dist.broadcast(due, src=0)
        return bool(due)

    def saved(self):
        self.last = time.time()


# bf16 dense tensor-core peak FLOP/s per GPU, for MFU. Matched by substring of the device name.
PEAK_FLOPS = [("H200", 989e12), ("H100 PCIe", 756e12), ("H100", 989e12), ("A100", 312e12),
              ("L40S", 362e12), ("A10G", 70e12), ("A10", 125e12), ("L4", 121e12),
              ("4090", 165e12), ("3090", 71e12), ("V100", 125e12), ("T4", 65e12)]


@lru_cache
def peak_flops(device):
    if not str(device).startswith("cuda"):
        return None
    name = torch.cuda.get_device_name(device)
    return next((f for key, f in PEAK_FLOPS if key in name), None)


def throughput(tokens, seconds, flops_per_token, proc):
    """tok_per_s of all processes together, and MFU (model FLOPs utilisation: the share of the
    GPUs' peak bf16 FLOP/s that the model's training FLOPs use) where the peak is known."""
    speed = {"tok_per_s": round(tokens / seconds)}
    peak = peak_flops(proc.device)
    if peak:
        speed["mfu"] = round(tokens * flops_per_token / seconds / (peak * proc.world_size), 4)
    return speed


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
    """Write out_dir/ckpt.pt: stage, kind of head, model config + weights, tokenizer checksum,
    base_id (the pretraining run the model descends from: models used together in one stage must
    share it), training state. out_dir/tokenizer.json is written once, when the run starts (see
    prepare_out_dir)."""
    def write(tmp):
        with open(tmp, "wb") as f:  # a Python file, so that a full disk raises an OSError
            torch.save(dict(stage=stage, head=model.head, model_config=vars(model.config),
                            model=model.state_dict(), tokenizer_checksum=tokenizer.checksum,
                            base_id=getattr(model, "base_id", None),
                            resume_format=RESUME_FORMAT, **state), f)
    atomic_write(os.path.join(out_dir, CKPT_FILE), write)


def update_checkpoint(out_dir, **fields):
    """Add what is known only after training to out_dir/ckpt.pt (a reward model's offset)."""
    path = os.path.join(out_dir, CKPT_FILE)
    ckpt = torch.load(path, map_location="cpu", weights_only=True)

    def write(tmp):
        with open(tmp, "wb") as f:
            torch.save({**ckpt, **fields}, f)
    atomic_write(path, write)


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
    """Returns (model, tokenizer, ckpt dict): a GPT, a ScalarHeadGPT for a checkpoint with a
    scalar head (reward model, critic), or a LikelihoodRewardGPT (reward model). Clear errors,
    naming `flag`, for a missing checkpoint, a file that is not one, a checkpoint of the wrong
    stage, or a tokenizer that is missing or does not match the weights. flag="--resume" reads
    out_dir of the run to continue."""
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
    try:  # checkpoints from before scalar heads record no head: language models
        model = {"lm": GPT, "scalar": ScalarHeadGPT,
                 "likelihood": LikelihoodRewardGPT}[ckpt.get("head", "lm")](
            GPTConfig(**ckpt["model_config"]))
        model.load_state_dict(ckpt["model"])
    except (KeyError, TypeError, ValueError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0]
        raise UserError(f"{path}: weights do not fit the model config it records ({first})") from e
    model.base_id = ckpt.get("base_id")  # see save_checkpoint
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
            record = {k: None if isinstance(v, float) and not math.isfinite(v) else v
                      for k, v in record.items()}  # strict JSON: an fp16 overflow's inf norm
            with open(self.path, "a") as f:
                f.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def logged_step(line):
    """The step of a log line; a line cut short by a crash counts as after every step."""
    try:
        return json.loads(line).get("step", 0)
    except ValueError:
        return math.inf


def jsonl_rows(path):
    """(where, object) for each non-empty line of a JSONL file, where = "path:line"; a file that
    cannot be read, a line that is not UTF-8 or not JSON: a UserError naming it."""
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        try:
            yield where, json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{where}: not valid JSON ({e.msg})") from None


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")
