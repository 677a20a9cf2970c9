"""How a stage's command starts and ends: its settings, its flags, and one true line however
it stops.

- settings: each stage declares its Settings dataclass (a default and a line of why per field,
  `setting`) and named presets; `parse_stage_args` turns them into flags whose --help shows the
  real default for the chosen preset, and `resolve_settings` merges preset, flags and a resumed
  run; `start_or_resume` opens every stage's run, new or resumed.
- `launch` runs a stage in this process (one of several under torchrun) and ends it with one
  line: bad input (exit 2), or Ctrl-C, a non-finite loss or a failed write (exit 1, naming what
  was saved).
- `run_stage`: the experiments run a stage script as a process of its own.
"""
import argparse
import contextlib
import os
import subprocess
import sys
from dataclasses import asdict, field, fields

import torch.distributed as dist

from checkpoints import CKPT_FILE, check_out_dir, load_checkpoint
from ground import (Terminated, UserError, die, positive, run_lock, sigterm_stops, stop_reason,
                    writable_dir)
from training import pick_device, setup_process


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
    given is left out of the namespace (args.given holds those that are), so that a resumed run
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
                               help=why if defaults[f.name] in (None, "") else
                               f"{why} (default: {defaults[f.name]})")
    args = p.parse_args(argv)
    args.given = {f.name: vars(args)[f.name] for f in fields(settings_cls)
                  if "why" in f.metadata and f.name in vars(args)}
    return args


def resolve_settings(settings_cls, presets, args, device, saved=None):
    """A new run: the dataclass defaults, then the preset, then the flags given. A resumed run:
    its saved settings, then the flags given (it cannot switch preset)."""
    if saved is None:
        preset = args.preset if args.preset != "auto" else preset_for(device)
        values = {**presets[preset], "preset": preset, **args.given}
    else:
        if args.preset not in ("auto", saved["preset"]):
            raise UserError(f"--preset {args.preset}: the run being resumed is a "
                            f"'{saved['preset']}' run; a resumed run keeps its settings "
                            "(drop --preset)")
        names = {f.name for f in fields(settings_cls)}
        values = {**{k: v for k, v in saved.items() if k in names}, **args.given}
    return settings_cls(**values)


def start_or_resume(args, stage, settings_cls, presets, device, source=None):
    """How every stage's run opens: (settings, model, tokenizer, checkpoint). --resume loads the
    run's own checkpoint of `stage` and keeps its saved settings (flags given again replace
    them); a new run takes preset and flags, refuses an --out-dir that holds a checkpoint or is
    the folder it starts from (source; by default its settings' init_from, where they have
    one), and gets None for the other three."""
    if args.resume:
        model, tok, ckpt = load_checkpoint(args.out_dir, [stage], device, "--resume")
        settings = resolve_settings(settings_cls, presets, args, device, ckpt["config"])
        return settings, model, tok, ckpt
    settings = resolve_settings(settings_cls, presets, args, device)
    source = source if source is not None else getattr(settings, "init_from", None)
    check_out_dir(args.out_dir, resume=False, source=source)
    return settings, None, None, None


def check_paths_exist(needed, out_dir):
    """On --resume: a path the run recorded that is gone (the project moved) is asked for by
    its flag. needed: (flag, path or None) pairs."""
    for flag, path in needed:
        if path and not os.path.exists(path):
            raise UserError(f"{flag} {path}: not found; the run in {out_dir} needs it: pass "
                            f"{flag} with where it is now")


def launch(run, args):
    """Call run(args, process) in this process (one of several under torchrun). However the run
    ends early, it ends with one line that says what is true: bad input (exit 2), or Ctrl-C,
    SIGTERM, a non-finite loss or a failed write (exit 1, naming what was saved). The process
    group is always closed."""
    created = not os.path.exists(args.out_dir)
    first = os.environ.get("RANK", "0") == "0"  # under torchrun, one lock for all processes
    try:
        if not args.resume or os.path.isdir(args.out_dir):  # before any work, not after it
            writable_dir(args.out_dir, "--out-dir")
        lock = (run_lock(args.out_dir, "--out-dir") if first and os.path.isdir(args.out_dir)
                else contextlib.nullcontext())
        with sigterm_stops(), lock:
            run(args, setup_process(args.device, args.dtype))
    except UserError as e:
        if created and first:  # a refused command leaves no empty folder behind
            with contextlib.suppress(OSError):  # not empty, or gone: leave it
                os.rmdir(args.out_dir)
        die(str(e))
    except (KeyboardInterrupt, FloatingPointError, OSError) as e:
        stop_run(e, args.out_dir)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


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
    stage = subprocess.Popen(command)
    try:
        stage.wait()
    except KeyboardInterrupt as e:  # Ctrl-C reached the stage too; SIGTERM is passed on
        if isinstance(e, Terminated):
            stage.terminate()
        stage.wait()  # the stage says what it saved, then this command stops
        raise
    if stage.returncode:
        raise UserError(f"{script} stopped (its message is above); the same command resumes it")


def stop_run(e, out_dir):
    """Exit after Ctrl-C, a non-finite loss or a failed write, saying what is on disk."""
    print(f"stopped: {stop_reason(e)}. {saved_state(out_dir, e)}", file=sys.stderr)
    sys.exit(1)


def saved_state(out_dir, e):
    ckpt = os.path.join(out_dir, CKPT_FILE)
    if not os.path.exists(ckpt):
        return (f"No checkpoint was saved in {out_dir} yet: there is nothing to resume, and the "
                "same command starts over")
    how = ("; the same settings diverge the same way: add a lower --lr, say"
           if isinstance(e, FloatingPointError) else "")
    return f"The last good checkpoint is intact: {ckpt} (--resume continues from it{how})"
