"""Training curves from a run's log.jsonl, one PNG per run folder (matplotlib: optional,
`pip install matplotlib`).

    python plot.py out/base out/sft out/reward out/ppo   # -> out/base/curves.png, ...
    python plot.py out/sft --out sft.png

What each panel shows depends on the stage, told by the keys its log has:
  base    the training loss and the validation loss
  sft     the chat loss (assistant tokens only), the replayed pretraining text's loss, validation
  reward  the ranking loss and the share of pairs ordered right, training and validation
  ppo     the reward model's and the teacher's (gold) score; KL to the SFT model; entropy,
          approx-KL and clip fraction
  dpo     the DPO loss and the share of pairs its implicit reward orders right; the implicit
          rewards of the better and the worse answers
  grpo    the reward (the teacher's or a reward model's) and the gold score; KL to the SFT
          model; the share of groups with no signal, entropy, approx-KL and clip fraction
"""
import argparse
import os

from ground import UserError, die, jsonl_rows

PANELS = {  # stage: [(panel title, [log keys])]
    "base": [("loss", ["loss", "val_loss"])],
    "sft": [("loss", ["loss", "replay_loss", "val_loss"])],
    "reward": [("loss", ["loss", "val_loss"]), ("pairs ordered right", ["accuracy",
                                                                         "val_accuracy"])],
    "ppo": [("score", ["score", "gold_score"]), ("KL to SFT (nats)", ["kl"]),
            ("policy", ["entropy", "approx_kl", "clip_fraction"])],
    "dpo": [("loss", ["loss", "val_loss"]), ("pairs ordered right", ["accuracy", "val_accuracy"]),
            ("implicit reward", ["better_reward", "worse_reward"])],
    "grpo": [("score", ["score", "gold_score"]), ("KL to SFT (nats)", ["kl"]),
             ("policy", ["no_signal_share", "entropy", "approx_kl", "clip_fraction"])],
}


def stage_of(rows):
    """The stage whose log these rows are, by its keys."""
    keys = set().union(*rows)
    for stage, key in (("grpo", "no_signal_share"), ("dpo", "better_reward"),
                       ("ppo", "gold_score"), ("ppo", "kl"), ("sft", "replay_loss"),
                       ("reward", "accuracy")):
        if key in keys:
            return stage
    return "base"


def read_log(folder):
    path = os.path.join(folder, "log.jsonl")
    if not os.path.isfile(path):
        raise UserError(f"{folder}: no log.jsonl (give a run's --out-dir)")
    rows = [row for _, row in jsonl_rows(path) if isinstance(row, dict) and "step" in row]
    if not rows:
        raise UserError(f"{path}: no logged steps yet")
    return rows


def plot(rows, path, title):
    """One panel per PANELS entry of the log's stage: each key against the step."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise UserError("plotting needs matplotlib: pip install matplotlib") from None
    panels = PANELS[stage_of(rows)]
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (name, keys) in zip(axes[0], panels):
        for key in keys:
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points), ".-" if len(points) < 60 else "-", label=key)
        ax.set(xlabel="step", title=name)
        ax.legend(fontsize=8)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", metavar="DIR", help="run folders (each with log.jsonl)")
    p.add_argument("--out", help="the PNG's path, for a single run (default: DIR/curves.png)")
    args = p.parse_args(argv)
    try:
        if args.out and len(args.runs) > 1:
            raise UserError("--out names one file: give one run, or leave it out")
        for folder in args.runs:
            rows = read_log(folder)
            path = args.out or os.path.join(folder, "curves.png")
            plot(rows, path, f"{folder} ({stage_of(rows)})")
            print(f"wrote {path}")
    except UserError as e:
        die(str(e))


if __name__ == "__main__":
    main()
