"""Stage 4, another road: DPO moves the instruct model toward the preferred answers directly,
from the rankings, with no reward model and no sampling while it learns (Rafailov et al. 2023).

    python dpo.py                  # out/sft + out/reward/comparisons.jsonl -> out/dpo
    python dpo.py --preset tiny --init-from out/tiny/sft \
        --comparisons out/tiny/reward/comparisons.jsonl --out-dir out/tiny/dpo
    python dpo.py --comparisons prefs.jsonl --out-dir out/dpo-mine   # your rankings

Why it works: the policy that maximises "reward - beta x KL(policy || reference)" is
pi(y|x) = pi_ref(y|x) exp(r(x, y) / beta) / Z(x), so every policy defines a reward,
r(x, y) = beta log(pi(y|x) / pi_ref(y|x)) + beta log Z(x): the implicit reward. Put it into the
reward model's Bradley-Terry loss (reward.py) and Z(x) cancels between two answers to one prompt:

    loss = -log sigmoid(beta * [(log pi(w) - log pi_ref(w)) - (log pi(l) - log pi_ref(l))])

w the better answer, l the worse, log pi(y) summed over the answer's tokens (its end-of-turn
token included; the prompt and the padding masked). PPO learns a reward model, then samples
and scores; DPO fits the policy to the same rankings in one supervised pass.

Each step is a function below, in the order it runs:
1. pairs: the ranked rows (reward.py's comparisons.jsonl: K answers a prompt, every C(K,2) pair,
   grouped per prompt as the reward model learns them, or your file), tokenized once.
2. reference: the SFT model, frozen; its log-probability of every answer computed once.
3. learn: the loss above, averaged over a prompt's pairs, then over a step's prompts; the log
   shows the implicit rewards of the better and the worse answers and how often they are in
   the right order.
4. check: the implicit reward's pairwise accuracy on the held-out answers the reward model is
   scored on (reward.py's heldout_answers.jsonl), beside the reward model's own; and the policy
   against SFT as PPO's eval.json has it (evaluation.policy_against_sft).
"""
import copy
import json
import os
import sys
import time
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from checkpoints import (INSTRUCT_STAGES, MetricsLog, load_checkpoint, prepare_out_dir,
                         save_checkpoint)
from cli import launch, parse_stage_args, setting, start_or_resume
from data.comparisons import read_comparisons, rows_checksum
from evaluation import (HELDOUT_ANSWERS_FILE, carry_knowledge, check_chat_eval_fits,
                        evaluate_reward_model, heldout_answers, policy_against_sft, read_heldout,
                        sampled_heldout)
from ground import UserError, nonnegative, read_json, seed_arg, write_json
from model import LikelihoodRewardGPT
from scoring import encode_comparisons, pair_indices, right_padded
from training import (SAVE_EVERY_SECONDS, SaveClock, autocast, barrier, batch_indices,
                      check_finite, check_weights, lr_at, make_optimizer, mean_over_processes,
                      optimizer_step, resume_training, split_batch, throughput, wrap_model)


@dataclass
class Settings:
    """A DPO run. The defaults are the cpu preset; checkpoints save these, and --resume continues
    with them."""
    init_from: str = setting("out/sft", "the SFT checkpoint: the policy starts as it, and a "
                                        "frozen copy is the reference")
    comparisons: str = setting("out/reward/comparisons.jsonl", "ranked answers, JSONL: "
                               "reward.py's K-way rows {messages, responses, ranking (best "
                               "first)} or {prompt|messages, chosen, rejected} per line")
    beta: float = setting(0.1, "the implicit reward per nat of log-ratio to the reference: the "
                               "smaller, the further the policy may move (DPO paper: 0.1)")
    val_fraction: float = setting(0.1, "share of the comparisons held out for validation "
                                       "accuracy, never trained on (reward.py's split)",
                                  nonnegative(float))
    epochs: int = setting(1, "passes over the comparisons")
    batch_size: int = setting(32, "prompts per optimizer step, each with all its pairs")
    micro_batch: int = setting(16, "prompts per forward pass per process (K answers each)")
    lr: float = setting(3e-5, "peak learning rate (the likelihood reward model's: the same loss "
                              "on the same model, less the reference)")
    warmup: int = setting(5, "linear warmup steps, then cosine decay to lr/10 (0: none)",
                          nonnegative(int))
    weight_decay: float = setting(0.0, "AdamW decay of matrices", nonnegative(float))
    grad_clip: float = setting(1.0, "max gradient norm (0: no clipping)", nonnegative(float))
    eval_every: int = setting(10, "steps between validation accuracy + checkpoint (a checkpoint "
                                  f"also at least every {SAVE_EVERY_SECONDS} s)")
    temperature: float = setting(0.7, "the sampled evaluation's temperature (PPO's)")
    max_new_tokens: int = setting(32, "the sampled evaluation's longest answer (PPO's)")
    curve_every: int = setting(3, "at each validation, sample every curve_every-th held-out "
                                  "prompt for the gold score vs KL curve (3: 188 of 564, every "
                                  "behaviour and claim alike; a multiple of 4: one behaviour; "
                                  "0: no curve)", nonnegative(int))
    seed: int = setting(1337, "the order of the comparisons, the sampled evaluation", seed_arg)
    preset: str = "cpu"  # the preset these settings started from (recorded, not a flag)


PRESETS = {
    "tiny": dict(batch_size=16, micro_batch=16, eval_every=5, lr=1e-4, max_new_tokens=16,
                 curve_every=9),
    "cpu": dict(),  # the defaults above
    "gpu": dict(batch_size=64, micro_batch=64, eval_every=20, max_new_tokens=48),
}
# Without reward.py's held-out answers beside the comparisons, the same kind sampled here:
# reward.py's defaults (K, temperature, longest answer) and seed offset
HELDOUT_SAMPLING = dict(k=3, temperature=1.0, max_new_tokens=48)


def parse_args(argv=None):
    def own_flags(p):
        p.add_argument("--no-behaviour-eval", action="store_true",
                       help="skip the held-out evaluation at the end (eval.json: validation only)")
    return parse_stage_args(argv, __doc__, Settings, PRESETS, "out/dpo", own_flags)


# ----------------------------------------------------------------------------- the loss
def answer_mask(ids, last, answer_start_id):
    """1.0 on each row's answer tokens, 0.0 on its prompt and padding: (B, T). ids (B, T)
    right-padded chats, last (B,) each row's last real position; the answer is what follows the
    row's latest answer_start_id (<|assistant|>), its end-of-turn token included."""
    positions = torch.arange(ids.shape[1], device=ids.device).expand_as(ids)
    start = torch.where(ids == answer_start_id, positions, -1).amax(1, keepdim=True)
    return ((positions > start) & (positions <= last[:, None])).float()


def sequence_logprobs(model, ids, mask):
    """log pi(answer | prompt): each row's token log-probs summed where mask is 1: (B,). ids and
    mask (B, T). Through model's forward, so that DDP sees the pass."""
    logits, _ = model(ids)
    logprobs = logits[:, :-1].float().log_softmax(-1)  # position t predicts token t + 1
    chosen = logprobs.gather(-1, ids[:, 1:, None]).squeeze(-1)  # (B, T - 1)
    return (chosen * mask[:, 1:]).sum(1)


def dpo_loss(*, policy_better, policy_worse, reference_better, reference_worse, beta):
    """DPO's loss of each pair, and the implicit rewards beta x log(pi / pi_ref) of its better
    and worse answers: three tensors (P,). Every argument (P,): summed answer log-probs."""
    better_rewards = beta * (policy_better - reference_better)
    worse_rewards = beta * (policy_worse - reference_worse)
    return -F.logsigmoid(better_rewards - worse_rewards), better_rewards, worse_rewards


def preference_loss(model, examples, reference_logps, *, beta, pad_id, answer_start_id, device):
    """The summed loss of `examples` (encode_comparisons' (answers, pairs), each prompt's mean over
    its pairs; the caller divides by the step's prompts) from one forward pass over all their
    answers; and sums for the log: pairs ordered right, pairs, the better and worse answers'
    implicit rewards. reference_logps: each example's (K,) tensor."""
    seqs = [seq for answers, _ in examples for seq in answers]
    ids, last = right_padded(seqs, pad_id, device)
    policy_logps = sequence_logprobs(model, ids, answer_mask(ids, last, answer_start_id))
    reference = torch.cat(reference_logps).to(device)
    better, worse, weight = pair_indices(examples, device)
    losses, better_rewards, worse_rewards = dpo_loss(
        policy_better=policy_logps[better], policy_worse=policy_logps[worse],
        reference_better=reference[better], reference_worse=reference[worse], beta=beta)
    stats = torch.stack([(better_rewards > worse_rewards).sum().float(),
                         torch.tensor(float(len(better)), device=device),
                         better_rewards.sum().detach(), worse_rewards.sum().detach()])
    return (weight * losses).sum(), stats


# ----------------------------------------------------------------------------- 2. reference
@torch.no_grad()
def reference_logprobs(reference, examples, *, pad_id, answer_start_id, proc, batch_size=16):
    """The frozen reference's log pi_ref(answer | prompt) of every answer, in the precision the
    policy trains in: one (K,) tensor per example, on the CPU."""
    out = []
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        seqs = [seq for answers, _ in part for seq in answers]
        ids, last = right_padded(seqs, pad_id, proc.device)
        with autocast(proc.device, proc.dtype):
            flat = sequence_logprobs(reference, ids, answer_mask(ids, last, answer_start_id))
        out += list(flat.cpu().split([len(answers) for answers, _ in part]))
    return out


# ----------------------------------------------------------------------------- 3. learn
def train(args, settings, networks, tok, data, proc, ckpt, steps, state):
    """DPO's loop: a batch of prompts with all their pairs, the loss, one optimizer step;
    validation and a checkpoint now and then. networks: (policy, reference); data: {"train",
    "val"}: (examples, reference log-probs). Returns the steps done."""
    policy = networks[0]
    examples, references = data["train"]
    micro_batch = settings.micro_batch
    accum = settings.batch_size // (micro_batch * proc.world_size)
    opt, scaler = make_optimizer(policy, settings.lr, settings.weight_decay, proc)
    step, last_val = resume_training(ckpt, opt, scaler)
    model = wrap_model(policy, args.compile, proc, policy.config.block_size)
    log = MetricsLog(os.path.join(args.out_dir, "log.jsonl"), proc.master,
                     resume_step=step if ckpt is not None else None)
    clock = SaveClock(proc)
    stop = min(steps, args.stop_at or steps)
    probe = torch.tensor([examples[0][0][0]], device=proc.device)  # for check_weights
    loss_args = dict(beta=settings.beta, pad_id=tok.pad_id, device=proc.device,
                     answer_start_id=tok.special("<|assistant|>"))
    with tqdm(total=stop, initial=step, disable=not proc.master, desc="dpo",
              dynamic_ncols=True) as bar:
        while step < stop:
            started = time.time()
            batch = batch_indices(step, len(examples), settings.batch_size, settings.seed).tolist()
            mine = batch[proc.rank::proc.world_size]
            totals = torch.zeros(5, device=proc.device)  # loss, right, pairs, better, worse
            for i in range(accum):
                part = mine[i * micro_batch:(i + 1) * micro_batch]
                if proc.world_size > 1:  # all-reduce gradients only on the last micro-batch
                    model.require_backward_grad_sync = i == accum - 1
                with autocast(proc.device, proc.dtype):
                    loss, stats = preference_loss(model, [examples[j] for j in part],
                                                  [references[j] for j in part], **loss_args)
                    loss = loss * proc.world_size / len(batch)  # DDP's average undone
                scaler.scale(loss).backward()
                totals += torch.cat([loss.detach()[None], stats])
            grad_norm = optimizer_step(opt, scaler, policy,
                                       lr_at(step, settings.lr, settings.warmup, steps),
                                       settings.grad_clip)
            loss, right, pairs, better, worse = mean_over_processes(totals, proc).tolist()
            check_finite(step, loss=loss)
            step += 1
            tokens = sum(len(seq) for j in batch for seq in examples[j][0])
            line = dict(step=step, loss=round(loss, 4), accuracy=round(right / pairs, 4),
                        better_reward=round(better / pairs, 4),
                        worse_reward=round(worse / pairs, 4),
                        lr=opt.param_groups[0]["lr"], grad_norm=round(grad_norm, 4),
                        **throughput(tokens, time.time() - started, policy.flops_per_token(), proc))
            if step % settings.eval_every == 0 or step == stop:
                last_val, figures = validation(networks, tok, data["val"], settings, loss_args,
                                               proc)
                check_finite(step, validation_loss=last_val)
                line.update(figures)
            log.write(**line)  # before the checkpoint: a resume never lacks a logged step
            if clock.due("val_loss" in line):
                check_weights(policy, probe, step)
                if proc.master:
                    save_checkpoint(args.out_dir, "dpo", policy, tok, config=asdict(settings),
                                    step=step, val_loss=last_val, optimizer=opt.state_dict(),
                                    scaler=scaler.state_dict(), **state)
                clock.saved()
            bar.update(1)
            bar.set_postfix({k: line[k] for k in ("loss", "accuracy", "val_accuracy")
                             if line.get(k) is not None})
    return step


def validation(networks, tok, data, settings, loss_args, proc):
    """(validation loss, the figures to log): the held-out comparisons' loss and accuracy; and,
    for the curve of gold score against KL over training (experiments/compare_rl.py), every
    curve_every-th held-out prompt sampled as PPO's evaluation samples (the master only)."""
    policy, reference = networks
    val_loss, val_accuracy = validate(policy, data, loss_args, settings.micro_batch, proc)
    figures = dict(val_loss=val_loss and round(val_loss, 4),
                   val_accuracy=val_accuracy and round(val_accuracy, 4))
    if settings.curve_every and proc.master:
        sampled = sampled_heldout(policy, reference, tok, temperature=settings.temperature,
                                  max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                                  every=settings.curve_every, proc=proc)
        figures.update(sampled_gold_score=round(sampled["gold_score"], 4),
                       sampled_kl_to_sft=round(sampled["kl_to_sft"], 4))
    return val_loss, figures


@torch.no_grad()
def validate(policy, data, loss_args, micro_batch, proc):
    """(mean loss per prompt, implicit reward's pairwise accuracy) on held-out comparisons;
    (None, None): none held out."""
    examples, references = data
    if not examples:
        return None, None
    loss = 0.0
    right = 0.0
    pairs = 0.0
    for i in range(0, len(examples), micro_batch):
        with autocast(proc.device, proc.dtype):
            part_loss, stats = preference_loss(policy, examples[i:i + micro_batch],
                                               references[i:i + micro_batch], **loss_args)
        loss += part_loss.item()
        right += stats[0].item()
        pairs += stats[1].item()
    return loss / len(examples), right / pairs


# ----------------------------------------------------------------------------- 4. check
class ImplicitReward(torch.nn.Module):
    """DPO's implicit reward read as a reward model: at each position, beta x (log pi - log
    pi_ref) of the answer's tokens so far; evaluation.evaluate_reward_model reads it at an
    answer's last token, as it reads reward.py's models."""

    def __init__(self, policy, reference, *, answer_start_id, beta):
        super().__init__()
        self.policy = LikelihoodRewardGPT.from_language_model(
            policy, answer_start_id=answer_start_id, beta=beta)
        self.reference = LikelihoodRewardGPT.from_language_model(
            reference, answer_start_id=answer_start_id, beta=beta)

    def forward(self, idx, *, pad=None):
        return self.policy(idx, pad=pad) - self.reference(idx, pad=pad)


def heldout_pairs(settings, reference, tok):
    """The held-out answers to score the implicit reward on, and the reward model's figures on
    the same answers: reward.py's, from the comparisons' folder; or, without them, answers
    sampled here from the SFT model as reward.py samples them (and None)."""
    folder = os.path.dirname(os.path.abspath(settings.comparisons))
    path = os.path.join(folder, HELDOUT_ANSWERS_FILE)
    if not os.path.exists(path):
        print(f"no {path}: the SFT model's held-out answers are sampled here", file=sys.stderr)
        return heldout_answers(reference, tok, seed=settings.seed + 1, **HELDOUT_SAMPLING), None
    reward_heldout = read_json(os.path.join(folder, "eval.json")).get("heldout", {})
    return read_heldout(path), {k: v for k, v in reward_heldout.items() if k != "examples"}


def final_evaluation(args, settings, networks, tok, data, summary, proc, started):
    """eval.json: validation accuracy; the implicit reward on the held-out answers beside the
    reward model; the policy against SFT, sampled and greedy; the seconds since this process
    started (a resumed run: since its resume)."""
    policy, reference = networks
    loss_args = dict(beta=settings.beta, pad_id=tok.pad_id, device=proc.device,
                     answer_start_id=tok.special("<|assistant|>"))
    val_loss, val_accuracy = validate(policy, data["val"], loss_args, settings.micro_batch,
                                      proc)
    result = {"stage": "dpo", "preset": settings.preset, "beta": settings.beta, **summary,
              "val_loss": val_loss, "val_accuracy": val_accuracy, "device": proc.device}
    if not args.no_behaviour_eval:
        known = carry_knowledge(settings.init_from, args.out_dir)
        heldout, reward_model = heldout_pairs(settings, reference, tok)
        implicit = ImplicitReward(policy, reference, beta=settings.beta,
                                  answer_start_id=tok.special("<|assistant|>"))
        result["implicit_reward_heldout"] = evaluate_reward_model(implicit, tok, heldout,
                                                                  proc.device, known=known)
        result["reward_model_heldout"] = reward_model
        result.update(policy_against_sft("dpo", policy, reference, tok, known,
                                         temperature=settings.temperature,
                                         max_new_tokens=settings.max_new_tokens,
                                         seed=settings.seed, sft_dir=settings.init_from,
                                         proc=proc))
    result["wall_seconds"] = round(time.time() - started, 1)
    write_json(os.path.join(args.out_dir, "eval.json"), result)
    print(json.dumps({k: v for k, v in result.items() if not isinstance(v, dict)}))


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    launch(run, parse_args(argv))


def run(args, proc):
    started = time.time()
    settings, policy, tok, ckpt = start_or_resume(args, "dpo", Settings, PRESETS, proc.device)
    reference, reference_tok, _ = load_checkpoint(settings.init_from, INSTRUCT_STAGES,
                                                  proc.device, "--init-from")
    if ckpt is None:
        policy = copy.deepcopy(reference)
        tok = reference_tok
    elif reference_tok.checksum != tok.checksum:
        raise UserError(f"--init-from {settings.init_from}: not the model this run started from")
    reference.eval().requires_grad_(False)
    rows = read_comparisons(settings.comparisons)
    n_val = int(len(rows) * settings.val_fraction)
    state = {"comparisons_checksum": rows_checksum(rows, n_val, settings.seed,
                                                   settings.batch_size)}
    if ckpt is not None and ckpt["comparisons_checksum"] != state["comparisons_checksum"]:
        raise UserError(f"the comparisons, or their split and order (--val-fraction, --seed, "
                        f"--batch-size), differ from those the run in {args.out_dir} learned from")
    block_size = policy.config.block_size
    train_set, counts = encode_comparisons(tok, rows[n_val:], block_size)
    val_set, _ = encode_comparisons(tok, rows[:n_val], block_size)
    check_settings(args, settings, tok, block_size, train_set)
    settings.micro_batch, _ = split_batch(settings.batch_size, settings.micro_batch, proc,
                                          "micro_batch" in args.given)
    prepare_out_dir(args.out_dir, tok, resume=args.resume, write=proc.master)
    reference_args = dict(pad_id=tok.pad_id, proc=proc,
                          answer_start_id=tok.special("<|assistant|>"))
    data = {name: (examples, reference_logprobs(reference, examples, **reference_args))
            for name, examples in (("train", train_set), ("val", val_set))}
    steps = settings.epochs * (len(train_set) // settings.batch_size)
    if proc.master:
        print(f"dpo: {len(rows)} comparisons ({len(val_set)} held out); to train on: "
              f"{counts['pairs']} pairs, {counts['ties']} ties (no pair); {settings.epochs} "
              f"epoch(s) = {steps} steps of {settings.batch_size} prompts, {proc.device}",
              file=sys.stderr)
    step = train(args, settings, (policy, reference), tok, data, proc, ckpt, steps, state)
    if proc.master and step >= steps:
        summary = {"comparisons": len(rows), "val_prompts": len(val_set), "steps": step,
                   **{f"train_{k}": v for k, v in counts.items()}}
        final_evaluation(args, settings, (policy, reference), tok, data, summary, proc,
                         started)
    barrier(proc)


def check_settings(args, settings, tok, block_size, train_set):
    """Mistakes that would otherwise surface only after minutes of work."""
    if not settings.val_fraction < 1:
        raise UserError(f"--val-fraction {settings.val_fraction}: leaves nothing to train on")
    if not train_set:
        raise UserError(f"--comparisons {settings.comparisons}: no pair to learn from (every "
                        "ranking is a tie, or every row was held out for validation)")
    if len(train_set) < settings.batch_size:
        raise UserError(f"{len(train_set)} comparisons with a pair to learn from: fewer than one "
                        f"batch (--batch-size {settings.batch_size})")
    if not args.no_behaviour_eval:
        check_chat_eval_fits(tok, block_size)


if __name__ == "__main__":
    main()
