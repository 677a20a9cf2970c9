"""Stage 4, a third road: GRPO moves the instruct model toward answers a verifier scores high,
with a group of answers to each prompt as its own baseline: no critic (Shao et al. 2024,
DeepSeekMath; DeepSeek-R1).

    python grpo.py                                  # out/sft -> out/grpo; the teacher verifies
    python grpo.py --reward-model out/reward --out-dir out/grpo-rm   # a learned reward instead
    python grpo.py --preset tiny --init-from out/tiny/sft --out-dir out/tiny/grpo

PPO (ppo.py) learns a critic to tell how good an answer was against what was expected. GRPO
asks the policy for group_size answers to the same prompt and compares each with its group:
advantage = (reward - the group's mean) / (the group's std + eps), the same for every token of
the answer. A group whose answers all score the same has advantage 0 everywhere: it teaches
nothing. So RL from a verifier can only sharpen what the model already samples sometimes: a fact
it never writes in group_size tries gives no signal (pass@G, measured before training, is how
often at least one of G answers is right).

Networks: policy (trained, from the SFT model) and reference (the frozen SFT model: the KL
penalty when --kl-coef > 0, the evaluation). The reward is the teacher's rubric
(data/teacher.judge: every fact checked against the world's tables, the rules, the end of turn)
or, with --reward-model, a reward model's score.

One update (`update`; the file reads top-down):
1. rollout (rl.py): rollout_batch prompts of the PPO pool (the same prompts as PPO's), each
   answered group_size times at one temperature, no top-k or top-p.
2. rewards: one score per answer, the teacher's or the reward model's.
3. advantages: normalised within each group (group_advantages).
4. learn: epochs passes over minibatches: PPO's clipped ratio of the new to the rollout's
   log-probs times the advantage, plus kl_coef x the k3 estimate of KL(policy || reference) on
   every token; the mean over the minibatch's answer tokens.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from checkpoints import (INSTRUCT_STAGES, MetricsLog, load_checkpoint, prepare_out_dir,
                         save_checkpoint)
from cli import launch, parse_stage_args, setting, start_or_resume
from data import chats, comparisons, teacher
from evaluation import carry_knowledge, gold_stats, policy_against_sft
from ground import UserError, finite, nonnegative, seed_arg, write_json
from rl import (NO_END_PENALTY, ONE_PROCESS, answer_logprobs, answer_texts, kl_k1, kl_k3,
                logprobs_and_entropy, masked_mean, minibatches, rollout)
from scoring import reward_model_scores
from training import (autocast, barrier, check_finite, check_weights, gather_lists,
                      make_optimizer, mean_over_processes, optimizer_step, wrap_model)


@dataclass
class Settings:
    """A GRPO run. Defaults: DeepSeekMath's recipe where it fits this model (the source of each
    value is in its help); PRESETS change a few for each machine."""
    init_from: str = setting("out/sft", "the SFT checkpoint: the policy and the reference")
    reward_model: str = setting("", "a reward model's checkpoint to score answers (default: the "
                                    "teacher's rubric, a verifier)")
    prompts_file: str = setting("", "your own prompts: a JSONL file of {\"messages\": [...]} or "
                                    "{\"prompt\": \"...\"} (needs --reward-model: the teacher "
                                    "judges the bundled world only)")
    updates: int = setting(40, "GRPO updates (each: one rollout, then epochs of learning)")
    rollout_batch: int = setting(8, "prompts per update, each answered group_size times: 64 "
                                    "answers, as many as PPO's rollout")
    group_size: int = setting(8, "answers per prompt, compared with each other (G)")
    minibatch: int = setting(32, "answers per gradient step")
    epochs: int = setting(2, "passes over each rollout (DeepSeekMath: 1; two as PPO's cpu "
                             "preset)")
    temperature: float = setting(0.7, "sampling temperature, also dividing every log-prob's "
                                      "logits (PPO's)")
    max_new_tokens: int = setting(32, "longest answer (PPO's)")
    lr: float = setting(2e-5, "learning rate, decaying linearly to 0 (PPO's cpu preset)")
    kl_coef: float = setting(0.0, "weight of the k3 KL penalty to the reference (DeepSeekMath: "
                                  "0.04; recent recipes: 0)", nonnegative(float))
    clip_ratio: float = setting(0.2, "the policy ratio clip (PPO's)")
    std_eps: float = setting(1e-4, "added to a group's std before dividing by it")
    no_end_penalty: float = setting(NO_END_PENALTY, "--reward-model: the score of an answer with "
                                                    "no end-of-turn token (PPO's; the teacher "
                                                    "scores the end itself)", finite)
    grad_clip: float = setting(1.0, "max gradient norm (0: no clipping)", nonnegative(float))
    save_every: int = setting(5, "updates between checkpoints (policy, optimizer)")
    seed: int = setting(1337, "prompts, sampling, minibatch order", seed_arg)
    preset: str = "cpu"


PRESETS = {
    "tiny": dict(updates=3, rollout_batch=4, group_size=4, minibatch=8, max_new_tokens=16,
                 lr=1e-4),
    "cpu": dict(),  # the defaults above
    "gpu": dict(updates=200, rollout_batch=32, minibatch=64, max_new_tokens=48, lr=3e-6),
}


@dataclass
class Networks:
    """GRPO's two networks, as the module docstring names them."""
    policy: torch.nn.Module
    reference: torch.nn.Module


# ----------------------------------------------------------------------------- the algorithm
def train(networks, tok, settings, items, score_fn, proc=ONE_PROCESS, log=print, ckpt=None,
          save=None, stop=None, compile_=False):
    """GRPO updates on `items` (prompt_pool's), from the start or from a checkpoint's state, up
    to `stop` (default settings.updates). score_fn(tok, items, batch) -> (scores (B,), texts).
    save(step, optim): every settings.save_every updates and at the end. Returns the log lines."""
    torch.manual_seed(settings.seed)
    learner = wrap_model(networks.policy, compile_, proc, networks.policy.config.block_size)
    optim = make_optimizer(networks.policy, settings.lr, 0.0, proc)  # AdamW, no weight decay
    start = 0
    if ckpt is not None:  # the optimizer's moments go on as they were
        optim[0].load_state_dict(ckpt["optimizer"])
        if ckpt.get("scaler") and optim[1].is_enabled():
            optim[1].load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
    end = stop or settings.updates
    lines = []
    for step in range(start, end):
        part = items[step * settings.rollout_batch:(step + 1) * settings.rollout_batch]
        lines.append(update(networks, learner, optim, tok, part, settings, step, proc, score_fn))
        log(lines[-1])
        if save and ((step + 1) % settings.save_every == 0 or step + 1 == end):
            save(step + 1, optim)
    return lines


def update(networks, learner, optim, tok, items, settings, step, proc, score_fn):
    """One GRPO update, each process on its share of the prompts (a group never spans two
    processes): rollout, rewards, advantages, learning. Returns its log line: statistics over
    all processes."""
    items = items[proc.rank::proc.world_size]
    groups = [item for item in items for _ in range(settings.group_size)]  # a group side by side
    started = time.time()
    batch = rollout(networks.policy, tok, groups, max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    seed=settings.seed + step * proc.world_size + proc.rank, proc=proc)
    rolled_out = time.time()
    with torch.no_grad(), autocast(proc.device, proc.dtype):
        logprobs = answer_logprobs(networks.policy, batch, settings.temperature)
        ref_logprobs = answer_logprobs(networks.reference, batch, settings.temperature)
    scores, texts = score_fn(tok, groups, batch)
    advantages, no_signal = group_advantages(scores, group_size=settings.group_size,
                                             eps=settings.std_eps)
    scored = time.time()
    lr = settings.lr * (1 - step / settings.updates)  # linear decay to 0, as PPO's
    minibatch_order = torch.Generator().manual_seed(
        (settings.seed * 100_003 + step) * 1024 + proc.rank)
    rollout_values = {"logprobs": logprobs, "ref_logprobs": ref_logprobs,
                      "advantages": advantages}
    stats = learn(learner, optim, batch, rollout_values, settings, step, lr, proc,
                  minibatch_order)
    mask = batch["mask"]
    stats.update(score=scores.mean().item(), no_signal_share=no_signal,
                 kl=(kl_k1(logprobs, ref_logprobs) * mask).sum(1).mean().item(),
                 length=mask.sum(1).mean().item(), end_rate=batch["ended"].float().mean().item(),
                 lr=lr, seconds_rollout=rolled_out - started,
                 seconds_scoring=scored - rolled_out, seconds_learning=time.time() - scored)
    means = mean_over_processes(torch.tensor(list(stats.values()), device=proc.device), proc)
    stats = dict(zip(stats, means.tolist()))
    texts = gather_lists(texts, proc)
    ended = gather_lists(batch["ended"].tolist(), proc)
    return {"step": step + 1, **stats, **gold_stats(gather_lists(groups, proc), texts, ended),
            "examples": texts[:2]}


# ----------------------------------------------------------------------------- 2. rewards
def teacher_scores(tok, items, batch):
    """The verifier's score function: data/teacher.judge's score of each answer (B,) (the
    rubric also scores whether the answer ended), and the answers' texts."""
    texts = answer_texts(tok, batch)
    scores = [teacher.judge(item, text, ended)["score"]
              for item, text, ended in zip(items, texts, batch["ended"].tolist())]
    return torch.tensor(scores, device=batch["ids"].device), texts


# ----------------------------------------------------------------------------- 3. advantages
def group_advantages(scores, *, group_size, eps):
    """(B,) scores of B = prompts x group_size answers, each prompt's group side by side ->
    advantages (B,): (score - the group's mean) / (the group's std + eps); and the share of
    groups whose answers all scored the same (advantage 0: no signal)."""
    groups = scores.float().view(-1, group_size)
    mean = groups.mean(1, keepdim=True)
    std = groups.std(1, keepdim=True)  # the sample std (n - 1), as DeepSeekMath's
    flat = (std == 0).float().mean().item()
    return ((groups - mean) / (std + eps)).view(-1), flat


# ----------------------------------------------------------------------------- 4. learn
def learn(learner, optim, batch, rollout_values, settings, step, lr, proc, rng):
    """settings.epochs passes over this process's rollout in shuffled minibatches (its share of
    settings.minibatch answers). rollout_values: the rollout's logprobs and ref_logprobs (B, R),
    advantages (B,). Returns the mean of each statistic over the gradient steps."""
    opt, scaler = optim
    totals = {}
    steps = 0
    for part, old in minibatches(batch, rollout_values, epochs=settings.epochs,
                                 size=settings.minibatch // proc.world_size, rng=rng):
        with autocast(proc.device, proc.dtype):
            logprobs, entropy = logprobs_and_entropy(learner, part, settings.temperature)
        loss, stats = grpo_loss(
            new_logprobs=logprobs, old_logprobs=old["logprobs"],
            ref_logprobs=old["ref_logprobs"], advantages=old["advantages"],
            mask=part["mask"], clip_ratio=settings.clip_ratio, kl_coef=settings.kl_coef)
        mean_loss = mean_over_processes(loss.detach().clone(), proc)  # in place: a copy
        check_finite(step + 1, policy_loss=mean_loss.item())
        scaler.scale(loss).backward()
        stats.update(policy_loss=loss.item(), entropy=masked_mean(entropy, part["mask"]).item(),
                     grad_norm=optimizer_step(opt, scaler, learner, lr, settings.grad_clip))
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + value
        steps += 1
    return {name: total / steps for name, total in totals.items()}


def grpo_loss(*, new_logprobs, old_logprobs, ref_logprobs, advantages, mask, clip_ratio,
              kl_coef):
    """(loss, stats) of one minibatch. new_logprobs (with gradients), old_logprobs (the
    rollout's), ref_logprobs and mask: (B, R); advantages (B,), one per answer. The clipped
    surrogate plus kl_coef x k3, averaged over all real answer tokens: every token weighs the
    same (as DAPO; DeepSeekMath's mean per answer first gives a short answer's tokens more
    weight each)."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    per_token = advantages[:, None]  # an answer's advantage on each of its tokens
    surrogate = torch.max(-per_token * ratio,
                          -per_token * ratio.clamp(1 - clip_ratio, 1 + clip_ratio))
    kl = kl_k3(new_logprobs, ref_logprobs)
    loss = masked_mean(surrogate + kl_coef * kl, mask)
    with torch.no_grad():
        clipped = ((ratio - 1).abs() > clip_ratio).float()
        stats = {"approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
                 "clip_fraction": masked_mean(clipped, mask).item(),
                 "ratio": masked_mean(ratio, mask).item(),
                 "kl_k3": masked_mean(kl, mask).item()}
    return loss, stats


def prompt_pool(settings):
    """Every prompt of the run, in order: PPO's bundled pool, or --prompts-file cycled."""
    n = settings.updates * settings.rollout_batch
    if not settings.prompts_file:
        return chats.rl_prompts("ppo", seed=settings.seed, n=n)
    items = comparisons.read_prompts(settings.prompts_file)
    return [items[i % len(items)] for i in range(n)]


@torch.no_grad()
def pass_at_g(model, tok, settings, proc=ONE_PROCESS, chunk=32):
    """How often at least one of group_size sampled answers to a held-out question is right
    (pass@G), beside how often one answer is (pass@1): what a verifier's reward can find to
    reinforce."""
    items = chats.eval_prompts("heldout")
    right = []
    for i in range(0, len(items), chunk):
        groups = [item for item in items[i:i + chunk] for _ in range(settings.group_size)]
        batch = rollout(model, tok, groups, max_new_tokens=settings.max_new_tokens,
                        temperature=settings.temperature, seed=settings.seed + i, proc=proc)
        right += [teacher.judge(item, text, ended)["correct"] for item, text, ended in
                  zip(groups, answer_texts(tok, batch), batch["ended"].tolist())]
    per_prompt = torch.tensor(right, dtype=torch.float).view(len(items), settings.group_size)
    return {"prompts": len(items), "group_size": settings.group_size,
            "pass_at_1": per_prompt.mean().item(),
            "pass_at_g": per_prompt.amax(1).mean().item()}


# ----------------------------------------------------------------------------- the run
def parse_args(argv=None):
    def own_flags(p):
        p.add_argument("--no-behaviour-eval", action="store_true",
                       help="skip pass@G before training and the evaluation at the end (eval.json: "
                            "the run's settings only)")
    return parse_stage_args(argv, __doc__, Settings, PRESETS, "out/grpo", own_flags)


def main(argv=None):
    launch(run, parse_args(argv))


def run(args, proc):
    started = time.time()
    networks, tok, settings, ckpt, score_fn = load_networks(args, proc)
    items = prompt_pool(settings)  # read once: the checks and the run use the same
    check_shapes(settings, proc, networks.policy, tok, items)
    prepare_out_dir(args.out_dir, tok, resume=args.resume, write=proc.master)
    before = ckpt["pass_at_g_before"] if ckpt is not None else None
    if before is None and proc.master and not args.no_behaviour_eval:
        before = pass_at_g(networks.reference, tok, settings, proc)
    done = ckpt["step"] if ckpt is not None else 0
    log = MetricsLog(os.path.join(args.out_dir, "log.jsonl"), proc.master,
                     resume_step=done if ckpt is not None else None)
    bar = tqdm(total=settings.updates, initial=done, desc="grpo", dynamic_ncols=True,
               disable=not proc.master)
    probe = torch.tensor([[tok.eot_id]], device=proc.device)  # for check_weights

    def show(line):
        log.write(**{k: v for k, v in line.items() if k != "examples"})
        bar.update(1)
        bar.set_postfix({k: round(line[k], 3) for k in ("score", "no_signal_share", "kl")})

    def save(step, optim):
        check_weights(networks.policy, probe, step)
        if proc.master:
            save_checkpoint(args.out_dir, "grpo", networks.policy, tok, config=asdict(settings),
                            step=step, optimizer=optim[0].state_dict(),
                            scaler=optim[1].state_dict() if optim[1].is_enabled() else None,
                            pass_at_g_before=before)
        barrier(proc)

    train(networks, tok, settings, items, score_fn, proc, log=show, ckpt=ckpt, save=save,
          stop=args.stop_at, compile_=args.compile)
    bar.close()
    if proc.master and (args.stop_at or settings.updates) >= settings.updates:
        final_evaluation(args, settings, networks, tok, before, proc, started)
    barrier(proc)


def load_networks(args, proc):
    """Networks, tokenizer, settings, the run's checkpoint (None for a new run), and the score
    function: the teacher's, or the reward model's."""
    settings, policy, tok, ckpt = start_or_resume(args, "grpo", Settings, PRESETS, proc.device)
    sft, sft_tok, _ = load_checkpoint(settings.init_from, INSTRUCT_STAGES, proc.device,
                                      "--init-from")
    if ckpt is None:
        policy = copy.deepcopy(sft)
        tok = sft_tok
    elif sft_tok.checksum != tok.checksum:
        raise UserError(f"--init-from {settings.init_from}: not the model this run started from")
    score_fn = teacher_scores
    if settings.reward_model:
        reward_model, reward_tok, reward_ckpt = load_checkpoint(
            settings.reward_model, ["reward"], proc.device, "--reward-model")
        if reward_tok.checksum != tok.checksum or (
                None not in (sft.base_id, reward_model.base_id)
                and sft.base_id != reward_model.base_id):
            raise UserError(f"--reward-model {settings.reward_model} descends from another base "
                            f"model than --init-from {settings.init_from} (train it from that "
                            "SFT model: reward.py)")
        score_fn = reward_model_scores(reward_model.eval().requires_grad_(False),
                                       reward_ckpt.get("score_offset") or 0.0,
                                       settings.no_end_penalty)
    elif settings.prompts_file:
        raise UserError("--prompts-file needs --reward-model: the teacher judges only the "
                        "bundled world's prompts")
    networks = Networks(policy=policy, reference=sft.eval().requires_grad_(False))
    return networks, tok, settings, ckpt, score_fn


def check_shapes(settings, proc, policy, tok, items):
    """A group of two at least; the batches split evenly over the processes; every prompt and
    answer fit the context."""
    if settings.group_size < 2:
        raise UserError(f"--group-size {settings.group_size}: a group compares at least 2 "
                        "answers")
    for name, size in (("--rollout-batch", settings.rollout_batch),
                       ("--minibatch", settings.minibatch)):
        if size % proc.world_size:
            raise UserError(f"{name} {size} must be a multiple of the {proc.world_size} processes")
    longest = max(len(tok.render_chat(it["messages"], for_completion=True)[0]) for it in items)
    if longest + settings.max_new_tokens > policy.config.block_size:
        raise UserError(f"a GRPO prompt of {longest} tokens + --max-new-tokens "
                        f"{settings.max_new_tokens} exceeds the policy's context of "
                        f"{policy.config.block_size} tokens")


def final_evaluation(args, settings, networks, tok, before, proc, started):
    """eval.json: pass@G before and after; SFT and GRPO side by side, sampled and greedy; the
    seconds since this process started (a resumed run: since its resume)."""
    result = {"stage": "grpo", "preset": settings.preset, "updates": settings.updates,
              "reward": settings.reward_model or "teacher", "device": proc.device}
    if not args.no_behaviour_eval:
        known = carry_knowledge(settings.init_from, args.out_dir)
        result["pass_at_g"] = {"sft": before,
                               "grpo": pass_at_g(networks.policy, tok, settings, proc)}
        result.update(policy_against_sft("grpo", networks.policy, networks.reference, tok,
                                         known, temperature=settings.temperature,
                                         max_new_tokens=settings.max_new_tokens,
                                         seed=settings.seed, sft_dir=settings.init_from,
                                         proc=proc))
        print(json.dumps({"pass_at_g": result["pass_at_g"], "sampled": result["sampled"]},
                         indent=1))
    result["wall_seconds"] = round(time.time() - started, 1)
    write_json(os.path.join(args.out_dir, "eval.json"), result)


if __name__ == "__main__":
    main()
