"""Stage 3: a reward model learns which answers a labeler prefers (the first half of RLHF).

The SFT model writes K answers to each prompt (K=3, as in the article); a labeler ranks them,
A > B > C; the reward model, the SFT model's trunk with a scalar head (model.ScalarHeadGPT),
learns to score the preferred answer higher. PPO (the next stage) then moves the policy toward
high scores, so whatever the labeler rewards, the policy learns, its biases included.

    python reward.py                                  # out/sft -> out/reward; the teacher ranks
    python reward.py --labeler human --prompts 40 --batch-size 8 --micro-batch 8 \
        --out-dir out/reward-mine                     # you rank them
    python reward.py --comparisons prefs.jsonl        # your rankings: K-way or chosen/rejected
    python reward.py --noise 0.3 --out-dir out/reward-noisy    # annotators who disagree
    python reward.py --sycophancy-bonus 0.5 --out-dir out/reward-sycophantic  # likes agreement

Each step is a function below, in the order it runs:
1. sample: for prompts about the training entities (data/chats.rl_prompts("reward"): questions
   and a quarter of user claims; PPO gets the other half of the facts), K answers each, in one
   batched, KV-cached call per batch, at temperature 1 so that they differ. An answer cut at
   --max-new-tokens without its end-of-turn token is kept: a bad answer the reward model must
   learn to score low.
2. rank: the teacher (data/teacher.py, with --noise, --flattery-bonus and --sycophancy-bonus),
   a person in the terminal (--labeler human), or your file (--comparisons). Rankings are
   written one JSON object a line to out/reward/comparisons.jsonl, {"messages", "responses",
   "ranking", ...}, best first, to inspect, edit or relabel. Two answers scored equally give no
   pair (a tie).
3. learn: the Bradley-Terry loss -log sigmoid(r_better - r_worse) averaged over all C(K,2) pairs
   of a prompt, all pairs of a prompt in the same batch (InstructGPT: treating the pairs as
   independent examples overfits). The score is read at the answer's last token: a scalar head
   (--score head), or beta x the answer's log-likelihood under the SFT model's own next-token
   head (--score likelihood, model.LikelihoodRewardGPT: it reads facts where a head hardly can).
4. check: pairwise accuracy on held-out comparisons while training; at the end, on answers about
   held-out entities judged by the teacher (evaluation.evaluate_reward_model, eval.json; the
   answers in heldout_answers.jsonl, where dpo.py scores its implicit reward too), and an
   offset stored in the checkpoint so that the mean score of the training comparisons' answers
   (the SFT model's own, unless --comparisons) is 0: PPO reads scores relative to SFT.
"""
import json
import os
import random
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import (INSTRUCT_STAGES, MetricsLog, load_checkpoint, prepare_out_dir,
                         save_checkpoint, update_checkpoint)
from cli import launch, parse_stage_args, setting, start_or_resume
from data import chats, teacher
from data.comparisons import (check_labeler, comparison, human_rankings, read_comparisons,
                              rows_checksum)
from evaluation import (carry_knowledge, check_chat_eval_fits, evaluate_reward_model,
                        HELDOUT_ANSWERS_FILE, heldout_answers, sample_answers, write_heldout)
from ground import UserError, choice, jsonl_rows, nonnegative, seed_arg, write_json, write_text
from model import LikelihoodRewardGPT, ScalarHeadGPT
from scoring import answer_ids, encode_comparisons, pair_indices, reward_scores, right_padded
from training import (SAVE_EVERY_SECONDS, SaveClock, autocast, barrier, batch_indices,
                      check_finite, check_weights, lr_at, make_optimizer, mean_over_processes,
                      optimizer_step, resume_training, split_batch, throughput, wrap_model)


@dataclass
class Settings:
    """A reward-model run. The defaults are the cpu preset; checkpoints save these, and
    --resume continues with them."""
    init_from: str = setting("out/sft", "the SFT checkpoint: it writes the answers, and its "
                                        "trunk starts the reward model")
    comparisons: str = setting(None, "your rankings instead of sampled ones, JSONL: {messages, "
                                     "responses, ranking (best first)} or {prompt|messages, "
                                     "chosen, rejected} per line")
    labeler: str = setting("teacher", "who ranks the sampled answers: teacher (data/teacher.py) "
                                      "or human (you, in the terminal)",
                           choice("teacher", "human"))
    prompts: int = setting(3200, "prompts to sample answers for (the reward pool of training "
                                 "facts, cycled with other system prompts and wordings)")
    k: int = setting(3, "answers per prompt, ranked together (the article's A > B > C)")
    temperature: float = setting(1.0, "sampling temperature: high enough that the K differ")
    max_new_tokens: int = setting(48, "an answer still going at this length is cut, and kept")
    noise: float = setting(0.0, "labeler disagreement: std of Gaussian noise on each teacher "
                                "score (0: a perfect labeler)", nonnegative(float))
    flattery_bonus: float = setting(0.0, "a biased labeler: extra score for an answer that "
                                         "flatters the user", nonnegative(float))
    sycophancy_bonus: float = setting(0.0, "a biased labeler: extra score for an answer that "
                                           "agrees with the user's claim, right or wrong",
                                      nonnegative(float))
    score: str = setting("head", "head (a scalar head on the SFT trunk, InstructGPT's) or "
                                 "likelihood (beta x the answer's log-likelihood under the SFT "
                                 "model's own next-token head)", choice("head", "likelihood"))
    beta: float = setting(0.1, "--score likelihood: score per nat of log-likelihood (the ranking "
                               "loss reads beta x the difference, as DPO's beta)")
    val_fraction: float = setting(0.1, "share of the comparisons held out for validation "
                                       "accuracy, never trained on", nonnegative(float))
    epochs: int = setting(1, "passes over the comparisons (InstructGPT: one; a second overfits: "
                             "66% held-out accuracy after one, 62% after two, cpu preset)")
    batch_size: int = setting(32, "prompts per optimizer step, each with all its pairs")
    micro_batch: int = setting(16, "prompts per forward pass per process (K answers each)")
    lr: float = setting(1e-3, "peak learning rate (--score likelihood: 3e-5 unless given, see "
                              "LIKELIHOOD_LR)")
    warmup: int = setting(5, "linear warmup steps, then cosine decay to lr/10 (0: none)",
                          nonnegative(int))
    weight_decay: float = setting(0.0, "AdamW decay of matrices", nonnegative(float))
    grad_clip: float = setting(1.0, "max gradient norm (0: no clipping)", nonnegative(float))
    eval_every: int = setting(10, "steps between validation accuracy + checkpoint (a checkpoint "
                                  f"also at least every {SAVE_EVERY_SECONDS} s)")
    seed: int = setting(1337, "which prompts, the sampled answers, the labeler's noise, the "
                              "order of the comparisons", seed_arg)
    preset: str = "cpu"  # the preset these settings started from (recorded, not a flag)


PRESETS = {
    "tiny": dict(prompts=96, lr=1e-4, batch_size=16, micro_batch=16, eval_every=5,
                 max_new_tokens=24),
    "cpu": dict(),  # the defaults above
    "gpu": dict(prompts=8000, batch_size=64, micro_batch=64, eval_every=20, lr=5e-4),
}
# A fresh head's step unlearns a next-token head: 69% of held-out fact pairs at 1e-4, 74% at 3e-5
LIKELIHOOD_LR = 3e-5
COMPARISONS_FILE = "comparisons.jsonl"
ANSWERS_FILE = "answers.jsonl"  # --labeler human: the answers, sampled once, then ranked


def parse_args(argv=None):
    def own_flags(p):
        p.add_argument("--no-behaviour-eval", action="store_true",
                       help="skip the held-out evaluation at the end (eval.json: validation only)")
    return parse_stage_args(argv, __doc__, Settings, PRESETS, "out/reward", own_flags)


# ----------------------------------------------------------------------------- 1. sample
def sampled(policy, tok, settings):
    """(prompt item, its distinct answers) for the prompts of the reward pool that got at least
    two different answers."""
    items = chats.rl_prompts("reward", seed=settings.seed, n=settings.prompts)
    answers = sample_answers(policy, tok, items, k=settings.k, temperature=settings.temperature,
                             max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                             desc="sample")
    kept = [(item, options) for item, options in zip(items, answers) if len(options) > 1]
    print(f"{len(items) - len(kept)} of {len(items)} prompts got fewer than two different "
          "answers: nothing to rank there", file=sys.stderr)
    return kept


# ----------------------------------------------------------------------------- 2. rank
def ranked_comparisons(args, settings, policy, tok, proc):
    """The ranked rows to learn from: the user's file, or answers sampled here and ranked by
    the teacher or a person, in out_dir/comparisons.jsonl. None: the person stopped early."""
    if settings.comparisons:
        return read_comparisons(settings.comparisons)
    path = os.path.join(args.out_dir, COMPARISONS_FILE)
    if args.resume:
        return read_comparisons(path)
    check_labeler(path, settings.labeler)
    if settings.labeler == "human" and proc.world_size > 1:
        raise UserError("--labeler human runs in one process (not under torchrun)")
    complete = True
    if proc.master and settings.labeler == "human":  # the answers are sampled once, then kept
        answers_path = os.path.join(args.out_dir, ANSWERS_FILE)
        if not os.path.exists(answers_path):
            write_text(answers_path, "".join(json.dumps({"item": item, "answers": options}) + "\n"
                                             for item, options in sampled(policy, tok, settings)))
        kept = [row for _, row in jsonl_rows(answers_path)]
        items = [row["item"] for row in kept]
        answers = [[tuple(option) for option in row["answers"]] for row in kept]
        complete = human_rankings(items, answers, path)
    elif proc.master:
        rng = random.Random(settings.seed)
        rows = []
        for i, (item, options) in enumerate(sampled(policy, tok, settings)):
            ranking, scores = teacher.rank(
                item, [text for text, _ in options], [ended for _, ended in options],
                noise=settings.noise, flattery_bonus=settings.flattery_bonus, rng=rng,
                sycophancy_bonus=settings.sycophancy_bonus)
            rows.append(comparison(i, item, options, ranking, scores))
        write_text(path, "".join(json.dumps(row) + "\n" for row in rows))
    barrier(proc)
    if not complete:
        print(f"ranked so far: {len(read_comparisons(path, allow_empty=True))} prompt(s), saved "
              f"in {path}; the same command goes on where you stopped", file=sys.stderr)
        return None
    return read_comparisons(path)


# ----------------------------------------------------------------------------- 3. learn
def ranking_loss(model, examples, pad_id, device):
    """Sum over the prompts of their mean Bradley-Terry loss -log sigmoid(r_better - r_worse)
    over pairs (the caller divides by the prompts of the step), and the number of pairs ordered
    right. Every answer of these prompts goes through one forward pass; each is scored at its
    last token."""
    seqs = [seq for answers, _ in examples for seq in answers]
    ids, last = right_padded(seqs, pad_id, device)
    scores = model(ids)[torch.arange(len(seqs), device=device), last]
    better, worse, weight = pair_indices(examples, device)
    margin = scores[better] - scores[worse]
    loss = (weight * -F.logsigmoid(margin)).sum()
    return loss, (margin > 0).sum()


@torch.no_grad()
def validate(model, examples, micro_batch, pad_id, proc):
    """(mean loss per prompt, pairwise accuracy) on held-out comparisons; (None, None): none."""
    if not examples:
        return None, None
    model.eval()
    loss = 0.0
    correct = 0
    for i in range(0, len(examples), micro_batch):
        with autocast(proc.device, proc.dtype):
            part_loss, part_correct = ranking_loss(model, examples[i:i + micro_batch], pad_id,
                                                   proc.device)
        loss += part_loss.item()
        correct += int(part_correct)
    model.train()
    return loss / len(examples), correct / sum(len(pairs) for _, pairs in examples)


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    launch(run, parse_args(argv))


def run(args, proc):
    settings, model, tok, ckpt = start_or_resume(args, "reward", Settings, PRESETS, proc.device)
    if ckpt is None and settings.score == "likelihood" and "lr" not in args.given:
        settings.lr = LIKELIHOOD_LR
    policy, tok_of_policy, _ = load_checkpoint(settings.init_from, INSTRUCT_STAGES, proc.device,
                                               "--init-from")
    if ckpt is None:
        torch.manual_seed(settings.seed)  # the scalar head's initial weights
        tok = tok_of_policy  # the SFT model's trunk with a scalar head, or all of it (--score)
        model = (ScalarHeadGPT.from_language_model(policy) if settings.score == "head" else
                 LikelihoodRewardGPT.from_language_model(
                     policy, answer_start_id=tok.special("<|assistant|>"), beta=settings.beta))
        model.base_id = policy.base_id
    elif tok_of_policy.checksum != tok.checksum:
        raise UserError(f"--init-from {settings.init_from}: not the model this run started from")
    check_settings(args, settings, tok, model.config.block_size)
    prepare_out_dir(args.out_dir, tok, resume=args.resume, write=proc.master)
    rows = ranked_comparisons(args, settings, policy, tok, proc)
    if rows is None:
        return  # a person stopped labeling; what they ranked is saved
    n_val = int(len(rows) * settings.val_fraction)
    state = {"comparisons_checksum": rows_checksum(rows, n_val, settings.seed,
                                                   settings.batch_size)}
    if ckpt is not None and ckpt["comparisons_checksum"] != state["comparisons_checksum"]:
        raise UserError(f"the comparisons, or their split and order (--val-fraction, --seed, "
                        f"--batch-size), differ from those the run in {args.out_dir} learned from")
    train_set, counts = encode_comparisons(tok, rows[n_val:], model.config.block_size)
    counts = {f"train_{k}": v for k, v in counts.items()}  # the validation rows' are not here
    val_set, _ = encode_comparisons(tok, rows[:n_val], model.config.block_size)
    if len(train_set) < settings.batch_size:
        raise UserError(f"{len(train_set)} comparisons with a pair to learn from: fewer than one "
                        f"batch (--batch-size {settings.batch_size})")
    settings.micro_batch, _ = split_batch(settings.batch_size, settings.micro_batch, proc,
                                          "micro_batch" in args.given)
    steps = settings.epochs * (len(train_set) // settings.batch_size)
    evaluate = proc.master and not args.no_behaviour_eval
    heldout = None
    if evaluate:  # the same answers each time: the seed after the run's
        heldout = heldout_answers(policy, tok, k=settings.k, temperature=settings.temperature,
                                  max_new_tokens=settings.max_new_tokens, seed=settings.seed + 1)
    del policy  # it has written every answer this stage needs
    if proc.master:
        print(f"reward model: {len(rows)} comparisons ({len(val_set)} held out); to train on: "
              f"{counts['train_pairs']} pairs, {counts['train_ties']} ties (no pair); "
              f"{settings.epochs} epoch(s) = {steps} steps of {settings.batch_size} prompts, "
              f"{proc.device}",
              file=sys.stderr)
    state["heldout_before"] = ckpt["heldout_before"] if ckpt is not None else None
    if ckpt is None and heldout is not None:  # the reward model before it learns: near chance
        before = evaluate_reward_model(model, tok, heldout, proc.device)
        state["heldout_before"] = before["accuracy"]
    step, _ = train(args, settings, model, tok, train_set, val_set, proc, ckpt, steps, state)
    if proc.master and step >= steps:
        summary = {"comparisons": len(rows), "val_prompts": len(val_set), **counts}
        final_evaluation(args, settings, model, tok, (rows[n_val:], val_set), heldout, state,
                         summary, step, proc)


def check_settings(args, settings, tok, block_size):
    """Mistakes that would otherwise surface only after minutes of sampling (or labeling)."""
    if settings.k < 2:
        raise UserError(f"--k {settings.k}: a ranking compares at least 2 answers")
    if args.resume and {"score", "beta"} & args.given.keys():
        raise UserError("--score and --beta make the model: a resumed run keeps its own")
    if settings.score == "head" and "beta" in args.given:
        raise UserError("--beta scales a log-likelihood: it needs --score likelihood")
    if not settings.val_fraction < 1:
        raise UserError(f"--val-fraction {settings.val_fraction}: leaves nothing to train on")
    trained = int(settings.prompts * (1 - settings.val_fraction))
    if not settings.comparisons and trained < settings.batch_size:
        raise UserError(f"--prompts {settings.prompts}: fewer than one batch after the validation "
                        f"split (--batch-size {settings.batch_size}); more prompts or a smaller "
                        "batch")
    if not args.no_behaviour_eval:
        check_chat_eval_fits(tok, block_size)


def train(args, settings, raw, tok, train_set, val_set, proc, ckpt, steps, state):
    """The reward model's loop: a batch of prompts, each with its K answers and all their pairs;
    the Bradley-Terry loss; one optimizer step; validation accuracy and a checkpoint now and
    then. Returns (steps done, last validation loss)."""
    micro_batch = settings.micro_batch
    accum = settings.batch_size // (micro_batch * proc.world_size)
    opt, scaler = make_optimizer(raw, settings.lr, settings.weight_decay, proc)
    step, last_val = resume_training(ckpt, opt, scaler)
    model = wrap_model(raw, args.compile, proc, raw.config.block_size)
    log = MetricsLog(os.path.join(args.out_dir, "log.jsonl"), proc.master,
                     resume_step=step if ckpt is not None else None)
    clock = SaveClock(proc)
    stop = min(steps, args.stop_at or steps)
    probe = torch.tensor([train_set[0][0][0]], device=proc.device)  # for check_weights
    # Ctrl-C, a non-finite loss or a failed write stops the run here; launch() says what is saved
    with tqdm(total=stop, initial=step, disable=not proc.master, desc="reward",
              dynamic_ncols=True) as bar:
        while step < stop:
            t0 = time.time()
            batch = [train_set[i] for i in batch_indices(step, len(train_set), settings.batch_size,
                                                         settings.seed).tolist()]
            mine = batch[proc.rank::proc.world_size]
            totals = torch.zeros(3, device=proc.device)  # loss, pairs ordered right, pairs
            for i in range(accum):
                part = mine[i * micro_batch:(i + 1) * micro_batch]
                if proc.world_size > 1:  # all-reduce gradients only on the last micro-batch
                    model.require_backward_grad_sync = i == accum - 1
                with autocast(proc.device, proc.dtype):
                    # the mean over the step's prompts; DDP's average over processes undone
                    loss, right = ranking_loss(model, part, tok.pad_id, proc.device)
                    loss = loss * proc.world_size / len(batch)
                scaler.scale(loss).backward()
                pairs = sum(len(p) for _, p in part)
                totals += torch.stack([loss.detach(), right.float(),
                                       torch.tensor(float(pairs), device=proc.device)])
            lr = lr_at(step, settings.lr, settings.warmup, steps)
            grad_norm = optimizer_step(opt, scaler, raw, lr, settings.grad_clip)
            loss, right, pairs = mean_over_processes(totals, proc).tolist()
            check_finite(step, loss=loss)
            step += 1
            tokens = sum(len(seq) for answers, _ in batch for seq in answers)
            stats = dict(step=step, loss=round(loss, 4), accuracy=round(right / pairs, 4),
                         lr=opt.param_groups[0]["lr"], grad_norm=round(grad_norm, 4), **throughput(
                             tokens, time.time() - t0, raw.flops_per_token(), proc))
            if step % settings.eval_every == 0 or step == stop:  # None: no comparison held out
                last_val, val_accuracy = validate(raw, val_set, micro_batch, tok.pad_id, proc)
                check_finite(step, validation_loss=last_val)
                stats.update(val_loss=last_val and round(last_val, 4),
                             val_accuracy=val_accuracy and round(val_accuracy, 4))
            log.write(**stats)  # before the checkpoint: a resume never lacks a logged step
            if clock.due("val_loss" in stats):
                check_weights(raw, probe, step)
                if proc.master:
                    save_checkpoint(args.out_dir, "reward", raw, tok, config=asdict(settings),
                                    step=step, val_loss=last_val, optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict(), **state)
                clock.saved()
            bar.update(1)
            bar.set_postfix({k: stats[k] for k in ("loss", "accuracy", "val_accuracy")
                             if stats.get(k) is not None})
    return step, last_val


# ----------------------------------------------------------------------------- 4. check
def final_evaluation(args, settings, model, tok, sets, heldout, state, summary, step, proc):
    """The offset that makes the mean score of the training prompts' answers 0 (stored in the
    checkpoint), and eval.json: validation accuracy, and held-out accuracy against the teacher."""
    t0 = time.time()
    train_rows, val_set = sets
    val_loss, val_accuracy = validate(model, val_set, settings.micro_batch, tok.pad_id, proc)
    seqs = [answer_ids(tok, row["messages"], text, ended) for row in train_rows
            for text, ended in zip(row["responses"], row["ended"])]
    offset = sum(reward_scores(model, seqs, tok.pad_id, proc.device)) / len(seqs)
    update_checkpoint(args.out_dir, score_offset=offset)
    result = {"stage": "reward", "preset": settings.preset, "steps": step,
              **{name: getattr(settings, name) for name in (
                  "labeler", "noise", "flattery_bonus", "sycophancy_bonus", "k", "score")},
              **summary,
              "val_loss": val_loss, "val_accuracy": val_accuracy, "score_offset": round(offset, 6),
              "device": proc.device}
    if heldout is not None:
        known = carry_knowledge(settings.init_from, args.out_dir)
        result["heldout"] = evaluate_reward_model(model, tok, heldout, proc.device, offset,
                                                  known=known)
        result["heldout_accuracy_before_training"] = state["heldout_before"]
        write_heldout(os.path.join(args.out_dir, HELDOUT_ANSWERS_FILE), heldout)  # for dpo.py
    result["eval_seconds"] = round(time.time() - t0, 1)
    write_json(os.path.join(args.out_dir, "eval.json"), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))
    if heldout is not None:
        print("heldout", json.dumps({k: v for k, v in result["heldout"].items()
                                     if k != "examples"}))


if __name__ == "__main__":
    main()
