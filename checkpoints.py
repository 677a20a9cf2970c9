"""Checkpoints and logs.

Checkpoints are directories (out/base, out/sft, ...) holding `ckpt.pt` (weights, model config,
training state; loaded with weights_only=True, so never an arbitrary pickle) and the tokenizer
file the model was trained with. Every write goes to a temporary file first and is then renamed
(ground.atomic_write), so a crash or Ctrl-C mid-write never leaves a half-written checkpoint
behind. `load_checkpoint` gives one-line errors for everything that can be wrong with a folder.
A run's log is a JSONL file, one line per step (`MetricsLog`).
"""
import json
import math
import os
import pickle
import time
import warnings

import torch

from data.tokenizer import Tokenizer
from ground import UserError, atomic_write, write_text
from model import GPT, GPTConfig, LikelihoodRewardGPT, ScalarHeadGPT

CKPT_FILE, TOKENIZER_FILE = "ckpt.pt", "tokenizer.json"
RESUME_FORMAT = 2  # the training state a checkpoint records; 2: data checksums, not paths
# the stages whose checkpoints are chat models that write answers (the policy stages start
# from any of them)
INSTRUCT_STAGES = ("sft", "ppo", "dpo", "grpo")


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
    broken = [name for name, tensor in ckpt["model"].items()
              if tensor.is_floating_point() and not torch.isfinite(tensor).all()]
    if broken:  # sampling would crash or print NUL bytes, a reward model would score nan
        raise UserError(f"{path}: weights that are not finite numbers (NaN or inf) in "
                        f"{broken[0]}" + (f" and {len(broken) - 1} more" if broken[1:] else "")
                        + ": the run that wrote them diverged; train it again (a lower --lr, "
                        "say)")
    model.base_id = ckpt.get("base_id")  # see save_checkpoint
    return model.to(device), tokenizer, ckpt


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
