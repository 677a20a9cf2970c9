"""The plumbing of a training step that every stage shares, so that each stage file keeps only
its own lesson (its loop).

- devices and processes: the device and dtype, DDP set-up (`setup_process`, `Process`), the
  wrapped model a loop calls (`wrap_model`: compiled, DDP), means and lists over processes;
- the step: AdamW with its weight-decay split, or Muon beside it (`make_optimizer`), the
  learning-rate schedule (`lr_at`), `optimizer_step` (unscale, clip, step, update, zero; returns
  the gradient norm), the micro-batch split over processes, the batches of a step;
- checks and clocks: a NaN stops the run before it reaches a checkpoint; a checkpoint at least
  every minute (`SaveClock`); tokens/s and MFU.
"""
import contextlib
import math
import os
import sys
import time
from dataclasses import dataclass
from functools import lru_cache

import torch
import torch.distributed as dist

from ground import UserError


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


def make_optimizer(model, lr, weight_decay, proc, fused=None, muon=False):
    """AdamW with weight decay on matrices (and embeddings) only, never on norm gains; and the
    GradScaler that fp16 needs (disabled otherwise). fused=None: the fused kernel on CUDA.
    muon: the transformer layers' weight matrices move by Muon instead (MuonAndAdamW)."""
    hidden = [p for p in model.layers.parameters() if p.dim() == 2] if muon else []
    if muon and not hasattr(torch.optim, "Muon"):
        raise UserError(f"--optimizer muon needs torch 2.9 or newer (this is {torch.__version__})")
    moved_by_muon = {id(p) for p in hidden}
    rest = [p for p in model.parameters() if id(p) not in moved_by_muon]
    decay = [p for p in rest if p.dim() >= 2]
    no_decay = [p for p in rest if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr,
                            betas=(0.9, 0.95),
                            fused=proc.device.startswith("cuda") if fused is None else fused)
    if muon:
        opt = MuonAndAdamW(torch.optim.Muon(hidden, lr=lr, weight_decay=weight_decay,
                                            adjust_lr_fn="match_rms_adamw"), opt)
    scaler = torch.amp.GradScaler(proc.device.split(":")[0],
                                  enabled=proc.dtype == torch.float16)
    return opt, scaler


class MuonAndAdamW:
    """Two optimizers behind one's interface (param_groups, step, zero_grad, state_dict), so that
    optimizer_step, the GradScaler and the checkpoints treat them as one.

    Muon (Jordan et al. 2024, torch.optim.Muon) keeps SGD's momentum, then replaces each weight
    matrix's update by the nearest orthogonal matrix (five Newton-Schulz iterations push its
    singular values towards 1): the gradient's rare directions move as fast as its dominant
    ones, and a matrix learns more per token. Its step is scaled to the size of AdamW's
    (match_rms_adamw, Moonlight's rule), so both share one learning rate and schedule.
    Embeddings, the output head and the norm gains are not transforms of a hidden state and stay
    on AdamW, as in modded-nanogpt and nanochat."""

    def __init__(self, muon, adamw):
        self.muon, self.adamw = muon, adamw

    @property
    def param_groups(self):  # read anew: load_state_dict replaces each optimizer's groups
        return self.muon.param_groups + self.adamw.param_groups

    def step(self):
        self.muon.step()
        self.adamw.step()

    def zero_grad(self, set_to_none=True):
        self.muon.zero_grad(set_to_none)
        self.adamw.zero_grad(set_to_none)

    def state_dict(self):
        return {"muon": self.muon.state_dict(), "adamw": self.adamw.state_dict()}

    def load_state_dict(self, state):
        self.muon.load_state_dict(state["muon"])
        self.adamw.load_state_dict(state["adamw"])


def resume_training(ckpt, opt, scaler):
    """(step, last validation loss) to start from: 0 and None for a new run; for a resumed one
    (ckpt: its checkpoint) its own, with the optimizer's moments and the loss scale restored."""
    if ckpt is None:
        return 0, None
    try:
        opt.load_state_dict(ckpt["optimizer"])
    except (KeyError, ValueError):
        raise UserError("--resume: the checkpoint's optimizer state is another optimizer's "
                        "(AdamW's, or Muon's beside it): resume with the --optimizer it was "
                        "saved with") from None
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


# Between evaluations a run still checkpoints this often, so that Ctrl-C or a crash never costs
# more than about a minute of training (the cpu preset's first evaluation is 3 minutes in).
SAVE_EVERY_SECONDS = 60


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
