"""Experiment: three roads after SFT on the same prompts, one report card.

    python -m experiments.compare_rl   # after ./run.sh: out/sft, out/reward -> out/experiments/
    python -m experiments.compare_rl --preset tiny --sft out/tiny/sft --reward out/tiny/reward \\
        --out-dir out/tiny/experiments/compare_rl   # a smoke test

From one SFT model and one reward model's comparisons, with the stage scripts (each skipped
when its eval.json exists, resumed after an interruption):
  ppo            ppo.py against the reward model (the article's road; or --ppo: a finished run)
  dpo            dpo.py on the reward model's comparisons: no reward model at all
  grpo_teacher   grpo.py with the teacher's rubric as the reward: a verifier, no learned model
  grpo_reward    grpo.py with the reward model as the reward
PPO and GRPO sample the same number of answers (the presets: 40 updates of 64; GRPO's are 8
prompts x 8 answers, so it sees an eighth of PPO's prompts, each 8 times). As many prompts as
PPO saw is 8 times the samples: --as-many-prompts (README measures it once).

Then best-of-n as a reference: n answers of the SFT model to each held-out prompt, the one the
teacher (or the reward model) likes best, its KL to SFT log n - (n - 1) / n (Stiennon et al.
2020). Writes summary.json, table.md (a row a model: greedy held-out accuracy and the known
facts stated, sampled gold score and KL to SFT, agreement with wrong claims, each rule's
adherence, invented facts out of scope, end of turn, wall time) and compare_rl.png (the sampled
gold score against sqrt(KL) on the held-out prompts: each model a point, best-of-n a curve; and
the same over training: PPO's and GRPO's rollouts, DPO's samples at each validation).
"""
import argparse
import math
import os

import torch

from checkpoints import INSTRUCT_STAGES, load_checkpoint
from cli import run_stage
from data import chats, teacher
from ground import (UserError, jsonl_rows, positive, read_json, run_or_die, write_json,
                    write_text)
from rl import answer_texts, rollout
from scoring import RewardScorer
from training import pick_device

METHODS = ("ppo", "dpo", "grpo_teacher", "grpo_reward")
COLORS = {"SFT": "black", "ppo": "tab:blue", "dpo": "tab:orange", "grpo_teacher": "tab:green",
          "grpo_reward": "tab:red"}  # one colour a model in both panels


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/sft", help="the SFT model every road starts from")
    p.add_argument("--reward", default="out/reward", help="the reward model and its "
                   "comparisons.jsonl (PPO's and GRPO's reward, DPO's pairs)")
    p.add_argument("--ppo", help="a finished PPO run from --sft and --reward to use (default: "
                   "trained here, so that every wall time is measured the same way)")
    p.add_argument("--as-many-prompts", action="store_true",
                   help="GRPO answers as many prompts as PPO did, 8 times each (8 times the "
                        "samples and about 6 times the wall time); default: as many answers")
    p.add_argument("--out-dir", default="out/experiments/compare_rl")
    p.add_argument("--max-n", type=positive(int), default=16,
                   help="largest n of best-of-n (a power of 2)")
    p.add_argument("--seed", type=int, help="for every stage script (default: each one's own)")
    p.add_argument("--preset", default="auto", help="for the stage scripts (tiny: a smoke test)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    run_or_die(run, parse_args(argv))


def run(args):
    if args.max_n & (args.max_n - 1):
        raise UserError(f"--max-n {args.max_n}: use a power of 2 (1, 2, 4 ... 16)")
    for path, flag in ((args.sft, "--sft"), (args.reward, "--reward")):
        if not os.path.exists(os.path.join(path, "eval.json")):
            raise UserError(f"{flag} {path}: no finished run there (./run.sh makes out/sft and "
                            "out/reward)")
    folders = train_all(args)
    os.makedirs(args.out_dir, exist_ok=True)
    evals = {}
    for name, folder in folders.items():
        evals[name] = read_json(os.path.join(folder, "eval.json"))
    rows = report_rows(evals)
    sampling = load_checkpoint(folders["ppo"], ["ppo"])[2]["config"]  # its sampled evaluation's
    curves = best_of_n(args, sampling["temperature"], sampling["max_new_tokens"])
    summary = {"rows": rows, "best_of_n": curves}
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    write_text(os.path.join(args.out_dir, "table.md"), table(rows))
    plot(rows, curves, training_curves(folders), os.path.join(args.out_dir, "compare_rl.png"))
    print(table(rows))


def train_all(args):
    """Each road's run folder, trained here unless it is there."""
    common = ["--init-from", args.sft, "--preset", args.preset]
    if args.seed is not None:
        common += ["--seed", str(args.seed)]
    folders = {name: os.path.join(args.out_dir, name) for name in METHODS}
    if args.ppo:
        folders["ppo"] = args.ppo
    else:
        run_stage("ppo.py", folders["ppo"], args.device, "--reward-model", args.reward, *common)
    run_stage("dpo.py", folders["dpo"], args.device, "--comparisons",
              os.path.join(args.reward, "comparisons.jsonl"), *common)
    if args.as_many_prompts:  # PPO's prompts per update, as many updates
        ppo = load_checkpoint(folders["ppo"], ["ppo"])[2]["config"]
        common += ["--rollout-batch", str(ppo["rollout_batch"]), "--updates", str(ppo["updates"])]
    run_stage("grpo.py", folders["grpo_teacher"], args.device, *common)
    run_stage("grpo.py", folders["grpo_reward"], args.device, "--reward-model", args.reward,
              *common)
    return folders


def report_rows(evals):
    """{model: its figures}: SFT (from the PPO run's evaluation of it) and each road's policy."""
    rows = {"SFT": figures(evals["ppo"], "sft")}
    for name, ev in evals.items():
        rows[name] = figures(ev, ev["stage"])
    return rows


def figures(ev, model):
    """One model's row from a policy stage's eval.json (model: its key there)."""
    greedy = ev[model]
    questions = greedy["heldout"]
    known = questions.get("base_knows", {})
    return {"heldout_accuracy": questions["accuracy"],
            "known_facts_stated": known.get("accuracy"),
            "new_wordings_accuracy": greedy["heldout_new_wordings"]["accuracy"],
            "sampled_gold_score": ev["sampled"][model]["gold_score"],
            "kl_to_sft": ev["sampled"][model]["kl_to_sft"],
            "agrees_with_wrong_claim_rate": greedy["heldout_claims"][
                "agrees_with_wrong_claim_rate"],
            **{f"adherence_{rule}": questions[f"adherence_{rule}"]
               for rule in ("one_word", "sentence", "uppercase")},
            "invented_fact_rate": greedy["out_of_scope_new_wordings"]["invented_fact_rate"],
            "end_of_turn_rate": questions["end_of_turn_rate"],
            "wall_seconds": ev.get("wall_seconds") if model != "sft" else None}


@torch.no_grad()
def best_of_n(args, temperature, max_new_tokens):
    """Best-of-n on the held-out prompts (the sampled evaluation's): for n = 1, 2, 4 ... max_n,
    the mean gold score of the teacher's favourite and of the reward model's favourite among
    the SFT model's first n answers, with the KL bound log n - (n - 1) / n."""
    device = pick_device(args.device)
    sft, tok, _ = load_checkpoint(args.sft, INSTRUCT_STAGES, device, "--sft")
    scorer = RewardScorer(args.reward, device, "--reward")
    items = chats.eval_prompts("heldout") + chats.claim_prompts("heldout")
    gold = torch.zeros(len(items), args.max_n)
    proxy = torch.zeros(len(items), args.max_n)
    for column in range(args.max_n):
        batch = rollout(sft.eval(), tok, items, max_new_tokens=max_new_tokens,
                        temperature=temperature, seed=10_000 + column)
        for row, (item, text, ended) in enumerate(zip(items, answer_texts(tok, batch),
                                                      batch["ended"].tolist())):
            gold[row, column] = teacher.judge(item, text, ended)["score"]
            proxy[row, column] = scorer(item["messages"], text, ended, tok)
    curves = []
    n = 1
    while n <= args.max_n:
        by_proxy = gold[:, :n].gather(1, proxy[:, :n].argmax(1, keepdim=True))
        curves.append({"n": n, "kl": math.log(n) - (n - 1) / n,
                       "gold_teacher_picks": gold[:, :n].amax(1).mean().item(),
                       "gold_reward_model_picks": by_proxy.mean().item()})
        n *= 2
    return curves


def training_curves(folders, window=5):
    """{run: [(sqrt KL, gold score)]}: each update's rollouts of PPO and GRPO (their own training
    prompts), running means over `window` updates; DPO, which samples nothing to learn, from a
    third of the held-out prompts sampled at each validation (dpo.py's curve_every)."""
    curves = {}
    for name in METHODS:
        lines = [row for _, row in jsonl_rows(os.path.join(folders[name], "log.jsonl"))]
        if name == "dpo":
            curves[name] = [(math.sqrt(max(line["sampled_kl_to_sft"], 0.0)),
                             line["sampled_gold_score"])
                            for line in lines if "sampled_gold_score" in line]
            continue
        points = []
        for i in range(len(lines)):
            recent = lines[max(0, i - window + 1):i + 1]
            kl = sum(line["kl"] for line in recent) / len(recent)
            gold = sum(line["gold_score"] for line in recent) / len(recent)
            points.append((math.sqrt(max(kl, 0.0)), gold))
        curves[name] = points
    return curves


def table(rows):
    """The report card as Markdown."""
    def pct(value):
        return "-" if value is None else f"{100 * value:.1f}%"
    lines = ["| model | held-out accuracy | known facts stated | new wordings | sampled gold | "
             "KL to SFT (nats) | agrees with wrong claims | one word / sentence / uppercase | "
             "invents out of scope | end of turn | wall time |", "|---" * 11 + "|"]
    for name, row in rows.items():
        wall = row["wall_seconds"]
        rules = " / ".join(pct(row[f"adherence_{r}"]) for r in ("one_word", "sentence",
                                                                "uppercase"))
        lines.append(
            f"| {name} | {pct(row['heldout_accuracy'])} | {pct(row['known_facts_stated'])} | "
            f"{pct(row['new_wordings_accuracy'])} | {row['sampled_gold_score']:.3f} | "
            f"{row['kl_to_sft']:.2f} | {pct(row['agrees_with_wrong_claim_rate'])} | {rules} | "
            f"{pct(row['invented_fact_rate'])} | {pct(row['end_of_turn_rate'])} | "
            f"{'-' if wall is None else f'{wall / 60:.1f} min'} |")
    return "\n".join(lines) + "\n"


def plot(rows, curves, training, path):
    """The gold score against sqrt(KL to SFT): on the held-out prompts, best-of-n curves and a
    point a model; over training, each update's rollouts of PPO and GRPO."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax, during) = plt.subplots(1, 2, figsize=(12, 4.4))
    root_kl = [math.sqrt(c["kl"]) for c in curves]
    for key, label, style in (("gold_teacher_picks", "best-of-n, the teacher picks", "-"),
                              ("gold_reward_model_picks", "best-of-n, the reward model picks",
                               "--")):
        ax.plot(root_kl, [c[key] for c in curves], style, color="gray", marker=".", label=label)
    for name, row in rows.items():
        ax.scatter(math.sqrt(max(row["kl_to_sft"], 0.0)), row["sampled_gold_score"], s=40,
                   zorder=3, color=COLORS.get(name))
        ax.annotate(name, (math.sqrt(max(row["kl_to_sft"], 0.0)), row["sampled_gold_score"]),
                    textcoords="offset points", xytext=(5, 3), fontsize=8)
    ax.set_xlabel("sqrt(KL to SFT), nats^0.5")
    ax.set_ylabel("gold score (the teacher's)")
    ax.set_title("held-out prompts, sampled: the end of each run", fontsize=10)
    ax.legend(fontsize=8)
    for name, points in training.items():
        during.plot([x for x, _ in points], [y for _, y in points], label=name,
                    marker="o" if name == "dpo" else None, markersize=4, color=COLORS[name])
    during.set_xlabel("sqrt(KL to SFT), nats^0.5")
    during.set_ylabel("gold score (the teacher's)")
    during.set_title("over training: PPO, GRPO: each update's rollouts (training prompts, "
                     "means over 5);\nDPO: a third of the held-out prompts at each validation",
                     fontsize=9)
    during.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


if __name__ == "__main__":
    main()
