"""Experiment: over-optimising a weak reward model (Gao, Schulman, Hilton 2022, "Scaling laws for
reward model overoptimization"). Push the policy toward a proxy reward model learned from few
comparisons, and watch the proxy's score and the teacher's (gold) score as the policy moves away
from the SFT model.

    python -m experiments.overoptimization   # after ./run.sh: out/sft -> out/experiments/...
    python -m experiments.overoptimization --preset tiny --sft out/tiny/sft --ppo-updates 4 \\
        --out-dir out/tiny/experiments/overoptimization   # a smoke test

1. reward.py --prompts `--comparisons`: the weak (proxy) reward model.
2. best-of-n: `--prompts` prompts of PPO's pool, `--max-n` answers each sampled from the SFT model
   at PPO's temperature; for n = 1, 2, 4 ... the answer the proxy likes best among the first n,
   scored by the proxy and by the teacher. Its KL to the SFT model is log n - (n - 1) / n (an
   upper bound, tight when the answers differ; Stiennon et al. 2020).
3. ppo.py against the proxy with --kl-coef 0 and with the default, pushed harder than the cpu
   preset (--ppo-updates, --ppo-lr): each update's proxy score, gold score and KL to SFT from its
   log.jsonl.
curves.csv holds every point (method, sqrt_kl, proxy, gold); curves.png plots both scores against
sqrt(KL) (PPO's as running means over 5 updates); summary.json the start, best and end of each.
The published result: the proxy keeps rising while the gold score peaks and falls.
"""
import argparse
import csv
import json
import math
import os

import torch
from tqdm import tqdm

from checkpoints import INSTRUCT_STAGES, load_checkpoint
from cli import run_stage
from data import chats, teacher
from ground import UserError, jsonl_rows, positive, run_or_die, write_json
from rl import NO_END_PENALTY
from scoring import answer_ids, reward_scores
from training import pick_device

SMOOTHING = 5  # PPO's curves: running means over this many updates


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="out/sft", help="the SFT model")
    p.add_argument("--out-dir", default="out/experiments/overoptimization")
    p.add_argument("--comparisons", type=positive(int), default=250,
                   help="prompts the weak reward model learns from (the main job's: 3,200)")
    p.add_argument("--prompts", type=positive(int), default=128, help="prompts for best-of-n")
    p.add_argument("--max-n", type=positive(int), default=64,
                   help="largest n of best-of-n (a power of 2)")
    p.add_argument("--temperature", type=positive(float), default=0.7,
                   help="sampling temperature of best-of-n and PPO (ppo.py's default)")
    p.add_argument("--max-new-tokens", type=positive(int), default=32,
                   help="longest answer, for best-of-n and PPO (ppo.py's cpu preset)")
    p.add_argument("--ppo-updates", type=positive(int), default=60,
                   help="PPO updates (the cpu preset: 40)")
    p.add_argument("--ppo-lr", type=positive(float), default=5e-5, help="PPO's learning rate, "
                   "above the cpu preset's 2e-5 to push the policy further from SFT")
    p.add_argument("--preset", default="auto", help="for reward.py and ppo.py (tiny: a smoke test)")
    p.add_argument("--device", default="auto")
    return p.parse_args(argv)


def main(argv=None):
    run_or_die(run, parse_args(argv))


def run(args):
    if args.max_n & (args.max_n - 1):
        raise UserError(f"--max-n {args.max_n}: use a power of 2 (1, 2, 4 ... 64)")
    if not os.path.exists(os.path.join(args.sft, "eval.json")):
        raise UserError(f"--sft {args.sft}: no finished SFT run there (./run.sh makes out/sft)")
    proxy_dir = os.path.join(args.out_dir, "reward_weak")
    run_stage("reward.py", proxy_dir, args.device, "--init-from", args.sft, "--prompts",
              str(args.comparisons), "--preset", args.preset)
    os.makedirs(args.out_dir, exist_ok=True)
    points = best_of_n(args, proxy_dir)
    for name, kl_coef in (("ppo_kl_coef_0", "0"), ("ppo_default_kl_coef", None)):
        ppo_dir = os.path.join(args.out_dir, name)
        run_stage("ppo.py", ppo_dir, args.device, "--init-from", args.sft, "--reward-model",
                  proxy_dir, "--updates", str(args.ppo_updates), "--lr", str(args.ppo_lr),
                  "--temperature", str(args.temperature), "--max-new-tokens",
                  str(args.max_new_tokens),
                  *(["--kl-coef", kl_coef] if kl_coef else []), "--preset", args.preset)
        points += ppo_points(name, ppo_dir)
    with open(os.path.join(args.out_dir, "curves.csv"), "w", newline="") as f:
        writer = csv.DictWriter(f, ["method", "n_or_update", "kl", "sqrt_kl", "proxy", "gold"])
        writer.writeheader()
        writer.writerows(points)
    curves = smoothed(points)
    write_json(os.path.join(args.out_dir, "summary.json"), summary(curves))
    plot(curves, os.path.join(args.out_dir, "curves.png"))
    print(json.dumps(summary(curves), indent=1))


@torch.no_grad()
def best_of_n(args, proxy_dir):
    """Points (method best_of_n, n, KL bound, proxy and gold score of the proxy's favourite
    among the first n answers, averaged over the prompts)."""
    sft, tok, _ = load_checkpoint(args.sft, INSTRUCT_STAGES, pick_device(args.device))
    device = sft.embed_tokens.weight.device
    proxy, _, proxy_ckpt = load_checkpoint(proxy_dir, ["reward"], device)
    offset = proxy_ckpt.get("score_offset") or 0.0
    items = chats.rl_prompts("ppo", seed=1, n=args.prompts)
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    end = tok.special("<|end|>")
    scores = []  # per round: [(proxy, gold)] per prompt
    for k in tqdm(range(args.max_n), desc="best-of-n samples", dynamic_ncols=True):
        rows = sft.generate(prompts, args.max_new_tokens, temperature=args.temperature,
                            stop_ids=[end, tok.eot_id], seed=k, pad_id=tok.pad_id)
        ended = [bool(row) and row[-1] == end for row in rows]
        texts = [tok.decode_turn(row[:-1] if e or (row and row[-1] == tok.eot_id) else row)
                 for row, e in zip(rows, ended)]
        proxies = reward_scores(proxy, [answer_ids(tok, it["messages"], t, e) for it, t, e in
                                        zip(items, texts, ended)], tok.pad_id, device, offset)
        scores.append([(p if e else NO_END_PENALTY, teacher.judge(it, t, e)["score"])
                       for p, e, it, t in zip(proxies, ended, items, texts)])
    points, n = [], 1
    while n <= args.max_n:
        best = [max((scores[k][i] for k in range(n)), key=lambda pair: pair[0])
                for i in range(len(items))]
        kl = math.log(n) - (n - 1) / n
        points.append({"method": "best_of_n", "n_or_update": n, "kl": kl, "sqrt_kl": kl ** 0.5,
                       "proxy": sum(p for p, _ in best) / len(best),
                       "gold": sum(g for _, g in best) / len(best)})
        n *= 2
    return points


def ppo_points(name, ppo_dir):
    """One point per PPO update: the proxy's and the teacher's mean score of that update's
    rollout answers, and its KL to SFT (clamped at 0: a batch estimate can dip below)."""
    lines = [row for _, row in jsonl_rows(os.path.join(ppo_dir, "log.jsonl"))]
    return [{"method": name, "n_or_update": r["step"], "kl": max(r["kl"], 0.0),
             "sqrt_kl": max(r["kl"], 0.0) ** 0.5, "proxy": r["score"], "gold": r["gold_score"]}
            for r in lines]


def smoothed(points, window=SMOOTHING):
    """PPO's points as running means over `window` updates (one batch of 64 answers is noisy);
    best-of-n's as they are."""
    out = []
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        for i, point in enumerate(mine):
            if method == "best_of_n":
                out.append(point)
                continue
            recent = mine[max(0, i - window + 1):i + 1]
            out.append({**point, **{key: sum(p[key] for p in recent) / len(recent)
                                    for key in ("kl", "proxy", "gold")}})
            out[-1]["sqrt_kl"] = out[-1]["kl"] ** 0.5
    return out


def summary(points):
    """Per method: the start, the point of highest gold score, and the end."""
    out = {}
    for method in dict.fromkeys(p["method"] for p in points):
        mine = [p for p in points if p["method"] == method]
        out[method] = {"first": mine[0], "best_gold": max(mine, key=lambda p: p["gold"]),
                       "last": mine[-1]}
    return out


def plot(points, path):
    """Proxy and gold score against sqrt(KL), side by side, one line per method."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"matplotlib is not installed: no {path} (pip install matplotlib; curves.csv has "
              "every point)")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in zip(axes, ("proxy", "gold"), ("proxy: the weak reward model's score",
                                                        "gold: the teacher's score")):
        for method in dict.fromkeys(p["method"] for p in points):
            mine = [p for p in points if p["method"] == method]
            ax.plot([p["sqrt_kl"] for p in mine], [p[key] for p in mine], ".-", label=method)
        ax.set(xlabel="sqrt(KL to the SFT model), sqrt(nats)", title=title)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
