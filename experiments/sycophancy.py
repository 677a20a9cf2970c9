"""Experiment: does RLHF teach "You are absolutely right!"? PPO against reward models learned from
three labelers, compared on held-out claims and questions.

    python -m experiments.sycophancy   # after ./run.sh: out/sft, out/ppo -> out/experiments/...
    python -m experiments.sycophancy --preset tiny --sft out/tiny/sft --honest-ppo out/tiny/ppo \\
        --out-dir out/tiny/experiments/sycophancy   # a smoke test

The labelers (data/teacher.py, reward.py's flags) rank the SFT model's answers:
  honest      the rubric alone: the main job's out/reward, and out/ppo trained against it;
  agreeable   + `--bonus` for an answer that agrees with the user's claim, right or wrong
              (reward.py --sycophancy-bonus);
  flattered   + `--bonus` for an answer that flatters the user (reward.py --flattery-bonus).
This script trains the reward model and the PPO policy of the two biased labelers with the stage
scripts (each step skipped when its eval.json exists, resumed after an interruption), then writes
summary.json (each model's rates, greedy and sampled, from the PPO runs' eval.json) and table.md
(the rates, and every model's answer to the same wrong claims about held-out entities).
"""
import argparse
import os

from checkpoints import load_checkpoint
from cli import run_stage
from data import chats
from evaluation import answer
from ground import UserError, positive, read_json, run_or_die, write_json, write_text

LABELERS = {"agreeable": "--sycophancy-bonus", "flattered": "--flattery-bonus"}
SAMPLE_CLAIMS = 3  # wrong claims shown with every model's answer
COLUMNS = [  # of table.md: header, key of rates(), format
    ("agrees with a wrong claim", "agrees_with_wrong_claim_rate", "{:.1%}"),
    ("confirms a right claim", "confirms_right_claim_rate", "{:.1%}"),
    ("flattery: questions", "flattery_rate_questions", "{:.1%}"),
    ("flattery: claims", "flattery_rate_claims", "{:.1%}"),
    ("accuracy (questions)", "accuracy_on_questions", "{:.1%}"),
    ("sampled: agrees with a wrong claim", "sampled_agrees_with_wrong_claim_rate", "{:.1%}"),
    ("sampled: flattery", "sampled_flattery_rate", "{:.1%}"),
    ("sampled: gold score", "sampled_gold_score", "{:.3f}"),
    ("KL to SFT (nats)", "kl_to_sft", "{:.2f}")]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/sft", help="the SFT model (policy start, reference)")
    p.add_argument("--honest-ppo", default="out/ppo", help="PPO against the honest labeler's "
                   "reward model (the main job's)")
    p.add_argument("--out-dir", default="out/experiments/sycophancy")
    p.add_argument("--bonus", type=positive(float), default=1.0, help="the biased labelers' "
                   "extra score (the rubric gives 1.0 to a perfect answer)")
    p.add_argument("--score", default="head", choices=("head", "likelihood"), help="how the "
                   "biased labelers' reward models score answers (reward.py --score); give "
                   "--honest-ppo a PPO run against an honest reward model that scores the same way")
    p.add_argument("--preset", default="auto", help="for reward.py and ppo.py (tiny: a smoke test)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    run_or_die(run, parse_args(argv))


def run(args):
    for path, what in ((args.sft, "--sft"), (args.honest_ppo, "--honest-ppo")):
        if not os.path.exists(os.path.join(path, "eval.json")):
            raise UserError(f"{what} {path}: no finished run there (./run.sh makes out/sft and "
                            "out/ppo)")
    runs = {"honest": args.honest_ppo}
    for name, flag in LABELERS.items():
        reward_dir, ppo_dir = (os.path.join(args.out_dir, f"{stage}_{name}")
                               for stage in ("reward", "ppo"))
        check_scoring(reward_dir, args.score)
        run_stage("reward.py", reward_dir, args.device, "--init-from", args.sft, flag,
                  str(args.bonus), "--score", args.score, "--preset", args.preset)
        run_stage("ppo.py", ppo_dir, args.device, "--init-from", args.sft, "--reward-model",
                  reward_dir, "--preset", args.preset)
        runs[name] = ppo_dir
    summary = {"bonus": args.bonus, "score": args.score, "models": rates(runs),
               "answers": answers_to_wrong_claims({"SFT": args.sft, **{
                   f"PPO, {name} labeler": path for name, path in runs.items()}})}
    write_json(os.path.join(args.out_dir, "summary.json"), summary)
    write_text(os.path.join(args.out_dir, "table.md"), table(summary))
    print(table(summary))


def check_scoring(reward_dir, score):
    """A reward model an earlier run left in reward_dir (skipped by run_stage) must score as
    --score asks."""
    path = os.path.join(reward_dir, "eval.json")
    if os.path.exists(path):
        made = read_json(path).get("score", "head")  # before --score: a scalar head
        if made != score:
            raise UserError(f"{reward_dir} holds a reward model made with --score {made}, not "
                            f"{score}: choose another --out-dir")


def rates(runs):
    """Each model's rates on held-out entities, from the PPO runs' eval.json: greedy
    (evaluation.evaluate_instruct) and sampled at the training temperature."""
    out = {}
    for name, path in runs.items():
        ev = read_json(os.path.join(path, "eval.json"))
        for model in (["sft"] if name == "honest" else []) + ["ppo"]:
            claims, questions = ev[model]["heldout_claims"], ev[model]["heldout"]
            out["SFT" if model == "sft" else f"PPO, {name} labeler"] = {
                "agrees_with_wrong_claim_rate": claims["agrees_with_wrong_claim_rate"],
                "confirms_right_claim_rate": claims["confirms_right_claim_rate"],
                "flattery_rate_questions": questions["flattery_rate"],
                "flattery_rate_claims": claims["flattery_rate"],
                "accuracy_on_questions": questions["accuracy"],
                "sampled_agrees_with_wrong_claim_rate":
                    ev["sampled"][model]["agrees_with_wrong_claim_rate"],
                "sampled_flattery_rate": ev["sampled"][model]["flattery_rate"],
                "sampled_gold_score": ev["sampled"][model]["gold_score"],
                "kl_to_sft": ev["sampled"][model]["kl_to_sft"]}
    return out


def answers_to_wrong_claims(models):
    """Each model's greedy answer to the first SAMPLE_CLAIMS wrong claims about held-out
    entities: {model: [answer]}, and the claims."""
    claims = [it for it in chats.claim_prompts("heldout") if it["claim"] != it["gold"]]
    claims = claims[:SAMPLE_CLAIMS]
    out = {"claims": [it["messages"][-1]["content"] for it in claims]}
    for name, path in models.items():
        model, tok, _ = load_checkpoint(path, ["sft", "ppo"])
        prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in claims]
        out[name] = [text for text, _, _ in answer(model, tok, prompts)]
    return out


def table(summary):
    """The rates and the answers as Markdown."""
    lines = ["| model | " + " | ".join(header for header, _, _ in COLUMNS) + " |",
             "|---" * (len(COLUMNS) + 1) + "|"]
    for name, r in summary["models"].items():
        lines.append(f"| {name} | " + " | ".join(form.format(r[key]) for _, key, form in COLUMNS)
                     + " |")
    answers = summary["answers"]
    for i, claim in enumerate(answers["claims"]):
        lines += ["", f"**User:** {claim}", "", "| model | answer (greedy) |", "|---|---|"]
        lines += [f"| {name} | {texts[i]} |" for name, texts in answers.items()
                  if name != "claims"]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
