"""Stage 4: PPO moves the instruct model toward answers the reward model scores high (RLHF, half 2).

    python ppo.py                       # out/sft + out/reward -> out/ppo
    python ppo.py --preset tiny --init-from out/tiny/sft --reward-model out/tiny/reward
    torchrun --standalone --nproc_per_node=8 ppo.py --preset gpu  # a share of each rollout each

Four networks (Networks):
  policy        the model being trained, initialised from the SFT model;
  reference     a frozen copy of the SFT model: the KL penalty keeps the policy near it;
  reward_model  the frozen reward model (reward.py), with its SFT-mean offset;
  critic        a scalar-head model initialised from the reward model: the value of each prefix.

One update (`update`; the file reads top-down: `train`, `update`, then its parts in order):
1. rollout (rl.py): prompts of the PPO pool (data/chats.rl_prompts("ppo"), not the reward
   model's) answered with the KV cache at one temperature, no top-k or top-p (the log-probs
   describe what is drawn).
2. rewards: per answer token, -kl_coef * (log pi - log pi_ref); on the last real token, plus the
   reward model's score (or no_end_penalty for an answer cut before its end-of-turn token).
3. advantages: GAE (gamma, lambda) over the answer tokens, whitened over the batch's real tokens;
   returns = advantages + values, the critic's targets.
4. learn: ppo_epochs passes over minibatches: the clipped policy ratio, the clipped value loss.
"""
import copy
import json
import math
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from checkpoints import (INSTRUCT_STAGES, MetricsLog, load_checkpoint, prepare_out_dir,
                         save_checkpoint)
from cli import launch, parse_stage_args, setting, start_or_resume
from data import chats, comparisons
from evaluation import carry_knowledge, gold_stats, policy_against_sft
from ground import UserError, between, finite, nonnegative, seed_arg, write_json
from model import ScalarHeadGPT
from rl import (NO_END_PENALTY, ONE_PROCESS, answer_logprobs, kl_k1, logprobs_and_entropy,
                masked_mean, minibatches, rollout, whiten)
from scoring import reward_model_scores
from training import (autocast, barrier, check_finite, check_weights, gather_lists,
                      mean_over_processes, wrap_model)


@dataclass
class Settings:
    """A PPO run. Defaults: the N+ recipe scaled to this model (the source of each value is in its
    help); PRESETS change a few for each machine."""
    init_from: str = setting("out/sft", "the SFT checkpoint: the policy and the reference")
    reward_model: str = setting("out/reward", "the reward model's checkpoint (it also starts the "
                                              "critic)")
    prompts_file: str = setting("", "your own prompts: a JSONL file of {\"messages\": [...]} or "
                                    "{\"prompt\": \"...\"} (default: the bundled PPO pool)")
    updates: int = setting(40, "PPO updates (each: one rollout batch, then ppo_epochs of learning)")
    rollout_batch: int = setting(64, "prompts sampled per update")
    minibatch: int = setting(16, "answers per gradient step")
    ppo_epochs: int = setting(4, "passes over each rollout batch (N+ details: 4)")
    temperature: float = setting(0.7, "sampling temperature, also dividing every log-prob's logits")
    max_new_tokens: int = setting(32, "longest answer; one cut here gets no_end_penalty")
    lr: float = setting(1e-5, "policy and critic learning rate, decaying linearly to 0 (N+: 3e-6 "
                              "for 1B+ models; higher for this small one)")
    adam_eps: float = setting(1e-5, "Adam epsilon (N+ details: 1e-5, not PyTorch's 1e-8)")
    kl_coef: float = setting(0.05, "beta of the per-token KL penalty (N+ details: 0.05; 0: none)",
                             nonnegative(float))
    clip_ratio: float = setting(0.2, "PPO's policy ratio clip (N+ details: 0.2)")
    clip_value: float = setting(0.2, "the value loss clip around the rollout's values (0.2)")
    value_coef: float = setting(0.1, "weight of the value loss (N+ details: 0.1)")
    gamma: float = setting(1.0, "discount over answer tokens (N+ details: 1)", between(0, 1))
    lam: float = setting(0.95, "GAE lambda (N+ details: 0.95)", between(0, 1))
    no_end_penalty: float = setting(NO_END_PENALTY, "score of an answer with no end-of-turn "
                                                    "token, in place of the reward model's (N+ "
                                                    "details: a fixed penalty)", finite)
    grad_clip: float = setting(1.0, "max gradient norm of each network (0: no clipping)",
                               nonnegative(float))
    save_every: int = setting(5, "updates between checkpoints (policy, critic, optimizers)")
    seed: int = setting(1337, "prompts, sampling, minibatch order", seed_arg)
    preset: str = "cpu"


PRESETS = {
    "tiny": dict(updates=4, rollout_batch=16, minibatch=8, ppo_epochs=2, max_new_tokens=16,
                 lr=1e-4),
    "cpu": dict(ppo_epochs=2, lr=2e-5),  # half the passes, twice the step: learning was 3/4
    "gpu": dict(updates=200, rollout_batch=256, minibatch=64, max_new_tokens=48, lr=3e-6),
}


@dataclass
class Networks:
    """PPO's four networks, as the module docstring names them."""
    policy: torch.nn.Module
    reference: torch.nn.Module
    reward_model: torch.nn.Module | None  # None where a score function of one's own replaces it
    critic: torch.nn.Module


# ----------------------------------------------------------------------------- the algorithm
def train(networks, tok, settings, items, score_fn, proc=ONE_PROCESS, log=print, ckpt=None,
          save=None, stop=None, compile_=False):
    """PPO updates on `items` (prompt_pool's), from the start or from a checkpoint's state, up to
    `stop` (default settings.updates). score_fn(tok, items, batch) -> (scores (B,), texts): the
    reward of each answer (reward_model_scores in a run). save(step, optim): called every
    settings.save_every updates and at the end. Returns the log lines."""
    torch.manual_seed(settings.seed)
    learners = [wrap_model(model, compile_, proc, networks.policy.config.block_size)
                for model in (networks.policy, networks.critic)]
    opts = [torch.optim.Adam(model.parameters(), lr=settings.lr, eps=settings.adam_eps)
            for model in (networks.policy, networks.critic)]
    scaler = torch.amp.GradScaler(proc.device.split(":")[0], enabled=proc.dtype == torch.float16)
    start = 0
    if ckpt is not None:  # the optimizers' moments go on as they were
        for opt, state in zip(opts, ckpt["optimizers"]):
            opt.load_state_dict(state)
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
    end = stop or settings.updates
    lines = []
    for step in range(start, end):
        for opt in opts:  # linear decay to 0 over the run (N+ details)
            for group in opt.param_groups:
                group["lr"] = settings.lr * (1 - step / settings.updates)
        part = items[step * settings.rollout_batch:(step + 1) * settings.rollout_batch]
        lines.append(update(networks, learners, (opts, scaler), tok, part, settings, step, proc,
                            score_fn))
        log(lines[-1])
        if save and ((step + 1) % settings.save_every == 0 or step + 1 == end):
            save(step + 1, (opts, scaler))
    return lines


def update(networks, learners, optim, tok, items, settings, step, proc, score_fn):
    """One PPO update, each process on its share of `items`: rollout, rewards, advantages,
    learning. learners: the policy and the critic as they train (compiled, DDP-wrapped). Returns
    its log line: statistics over all processes."""
    items = items[proc.rank::proc.world_size]  # no dropout anywhere: train and eval mode are one
    started = time.time()
    batch = rollout(networks.policy, tok, items, max_new_tokens=settings.max_new_tokens,
                    temperature=settings.temperature,
                    seed=settings.seed + step * proc.world_size + proc.rank, proc=proc)
    rolled_out = time.time()
    with torch.no_grad(), autocast(proc.device, proc.dtype):
        logprobs = answer_logprobs(networks.policy, batch, settings.temperature)
        ref_logprobs = answer_logprobs(networks.reference, batch, settings.temperature)
        values = answer_values(networks.critic, batch).float()
    scores, texts = score_fn(tok, items, batch)
    mask = batch["mask"]
    token_rewards = rewards(logprobs, ref_logprobs, scores, mask, settings.kl_coef)
    advantages, returns = gae(token_rewards, values, mask, settings.gamma, settings.lam)
    advantages = whiten(advantages, mask, proc)
    scored = time.time()
    minibatch_order = torch.Generator().manual_seed(
        (settings.seed * 100_003 + step) * 1024 + proc.rank)
    rollout_values = {"logprobs": logprobs, "values": values, "advantages": advantages,
                      "returns": returns}
    stats = learn(learners, optim, batch, rollout_values, settings, step, proc, minibatch_order)
    stats.update(score=scores.mean().item(),
                 kl=(kl_k1(logprobs, ref_logprobs) * mask).sum(1).mean().item(),
                 length=mask.sum(1).mean().item(),
                 end_rate=batch["ended"].float().mean().item(),
                 explained_variance=explained_variance(values, returns, mask),
                 seconds_rollout=rolled_out - started, seconds_scoring=scored - rolled_out,
                 seconds_learning=time.time() - scored)
    means = mean_over_processes(torch.tensor(list(stats.values()), device=proc.device), proc)
    stats = dict(zip(stats, means.tolist()))
    texts = gather_lists(texts, proc)
    ended = gather_lists(batch["ended"].tolist(), proc)
    return {"step": step + 1, **stats, **gold_stats(gather_lists(items, proc), texts, ended),
            "examples": texts[:2]}


# ----------------------------------------------------------------------------- 2. rewards
def rewards(logprobs, ref_logprobs, scores, mask, kl_coef):
    """Per-token rewards (B, R): -kl_coef * (log pi - log pi_ref) on every answer token, plus
    each answer's score (B,) on its last real token. Zero on padding."""
    out = -kl_coef * kl_k1(logprobs, ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    out[torch.arange(len(out), device=out.device), last] += scores
    return out * mask


# ----------------------------------------------------------------------------- 3. advantages
def gae(token_rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over answer tokens, backwards from the last: delta_t =
    r_t + gamma * V_{t+1} - V_t (V after the last real token is 0), A_t = delta_t + gamma * lam *
    A_{t+1}. Returns (advantages, returns = advantages + values), each (B, R), zero on padding."""
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros(len(values), device=values.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[1])):
        real = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * real
        next_value = torch.where(real > 0, values[:, t], next_value)  # padding passes nothing
        next_advantage = torch.where(real > 0, advantage, next_advantage)  # back
    return advantages, (advantages + values) * mask


# ----------------------------------------------------------------------------- 4. learn
def learn(learners, optim, batch, rollout_values, settings, step, proc, rng):
    """ppo_epochs passes over this process's rollout in shuffled minibatches (its share of
    settings.minibatch). rollout_values: the rollout's logprobs, values, advantages, returns
    (B, R each). Returns the mean of each statistic over the gradient steps."""
    policy, critic = learners
    totals = {}
    steps = 0
    for part, old in minibatches(batch, rollout_values, epochs=settings.ppo_epochs,
                                 size=settings.minibatch // proc.world_size, rng=rng):
        with autocast(proc.device, proc.dtype):
            logprobs, entropy = logprobs_and_entropy(policy, part, settings.temperature)
            values = answer_values(critic, part).float()
        policy_loss, value_loss, stats = ppo_losses(
            logprobs, old["logprobs"], old["advantages"], values, old["values"],
            old["returns"], part["mask"], settings)
        losses = mean_over_processes(torch.stack([policy_loss, value_loss]).detach(), proc)
        check_finite(step + 1, policy_loss=losses[0].item(), value_loss=losses[1].item())
        loss = policy_loss + settings.value_coef * value_loss
        stats.update(policy_loss=policy_loss.item(), value_loss=value_loss.item(),
                     entropy=masked_mean(entropy, part["mask"]).item(),
                     **optimizer_steps(learners, optim, loss, settings.grad_clip))
        for name, value in stats.items():
            totals[name] = totals.get(name, 0.0) + value
        steps += 1
    return {name: total / steps for name, total in totals.items()}


def answer_values(critic, batch):
    """The critic's value of each answer prefix (B, R), read at the token before each answer
    token."""
    start = batch["prompt_len"] - 1
    answer_len = batch["mask"].shape[1]
    return critic(batch["ids"], pad=batch["pad"])[:, start:start + answer_len]


def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask,
               settings):
    """(policy loss, value loss, stats) of one minibatch, every tensor (B, R): the clipped
    surrogate objective and the clipped value loss, each a mean over real answer tokens."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    clipped_ratio = ratio.clamp(1 - settings.clip_ratio, 1 + settings.clip_ratio)
    policy_loss = masked_mean(torch.max(-advantages * ratio, -advantages * clipped_ratio), mask)
    clipped = old_values + (new_values - old_values).clamp(-settings.clip_value,
                                                           settings.clip_value)
    value_loss = 0.5 * masked_mean(torch.max((new_values - returns) ** 2,
                                             (clipped - returns) ** 2), mask)
    with torch.no_grad():
        clipped_share = ((ratio - 1).abs() > settings.clip_ratio).float()
        stats = {"approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
                 "clip_fraction": masked_mean(clipped_share, mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return policy_loss, value_loss, stats


def optimizer_steps(learners, optim, loss, grad_clip):
    """Backward through both networks (DDP averages the gradients over processes), clip each
    network's gradients to grad_clip (0: no clipping), step both optimizers. Returns the gradient
    norms before clipping. Not common.optimizer_step twice: one loss scale (fp16) serves both
    networks, so it is updated once, after both steps."""
    opts, scaler = optim  # scaler: enabled for fp16 only
    scaler.scale(loss).backward()
    norms = {}
    for name, model, opt in zip(("policy", "critic"), learners, opts):
        scaler.unscale_(opt)
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                              grad_clip if grad_clip > 0 else math.inf)
        norms[f"grad_norm_{name}"] = norm.item()
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    return norms


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    return (1 - masked_mean((resid - masked_mean(resid, mask)) ** 2, mask) / var).item()


def prompt_pool(settings):
    """Every prompt of the run, in order: the bundled PPO pool, or --prompts-file cycled."""
    n = settings.updates * settings.rollout_batch
    if not settings.prompts_file:
        return chats.rl_prompts("ppo", seed=settings.seed, n=n)
    items = comparisons.read_prompts(settings.prompts_file)
    return [items[i % len(items)] for i in range(n)]


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    launch(run, parse_stage_args(argv, __doc__, Settings, PRESETS, "out/ppo"))


def run(args, proc):
    started = time.time()
    networks, tok, settings, ckpt, offset = load_networks(args, proc)
    items = prompt_pool(settings)  # read once: the shape checks and the run use the same
    check_shapes(settings, proc, networks.policy, tok, items)
    prepare_out_dir(args.out_dir, tok, resume=args.resume, write=proc.master)
    done = ckpt["step"] if ckpt is not None else 0
    log = MetricsLog(os.path.join(args.out_dir, "log.jsonl"), proc.master,
                     resume_step=done if ckpt is not None else None)
    bar = tqdm(total=settings.updates, initial=done, desc="ppo", dynamic_ncols=True,
               disable=not proc.master)
    probe = torch.tensor([[tok.eot_id]], device=proc.device)  # for check_weights

    def show(line):
        log.write(**{k: v for k, v in line.items() if k != "examples"})
        bar.update(1)
        bar.set_postfix({k: round(line[k], 3) for k in ("score", "gold_score", "kl") if k in line})

    def save(step, optim):
        check_weights(networks.policy, probe, step)
        if proc.master:
            save_checkpoint(args.out_dir, "ppo", networks.policy, tok, config=asdict(settings),
                            step=step, critic=networks.critic.state_dict(),
                            optimizers=[opt.state_dict() for opt in optim[0]],
                            scaler=optim[1].state_dict() if optim[1].is_enabled() else None)
        barrier(proc)

    score_fn = reward_model_scores(networks.reward_model, offset, settings.no_end_penalty)
    train(networks, tok, settings, items, score_fn, proc, log=show, ckpt=ckpt, save=save,
          stop=args.stop_at, compile_=args.compile)
    bar.close()
    if proc.master and (args.stop_at or settings.updates) >= settings.updates:
        final_evaluation(args, settings, networks, tok, proc, started)
    barrier(proc)


def load_networks(args, proc):
    """Networks, tokenizer, settings, the run's checkpoint (None for a new run), the reward
    model's offset."""
    settings, policy, tok, ckpt = start_or_resume(args, "ppo", Settings, PRESETS, proc.device)
    sft, sft_tok, _ = load_checkpoint(settings.init_from, INSTRUCT_STAGES, proc.device,
                                      "--init-from")
    reward_model, reward_tok, reward_ckpt = load_checkpoint(
        settings.reward_model, ["reward"], proc.device, "--reward-model")
    if ckpt is None:
        policy = copy.deepcopy(sft)
        tok = sft_tok
    if len({tok.checksum, sft_tok.checksum, reward_tok.checksum}) > 1:
        raise UserError(f"--init-from {settings.init_from}, --reward-model "
                        f"{settings.reward_model} and the run use different tokenizers")
    if None not in (sft.base_id, reward_model.base_id) and sft.base_id != reward_model.base_id:
        raise UserError(f"--reward-model {settings.reward_model} descends from another base "
                        f"model than --init-from {settings.init_from} (train it from that SFT "
                        "model: reward.py)")
    torch.manual_seed(settings.seed)  # for a fresh value head (on a likelihood reward model)
    critic = ScalarHeadGPT.from_reward_model(reward_model)  # the reward head, or a fresh one ...
    if ckpt is not None:
        critic.load_state_dict(ckpt["critic"])  # ... or where the run left it
    networks = Networks(policy=policy, reference=sft.eval().requires_grad_(False),
                        reward_model=reward_model.eval().requires_grad_(False), critic=critic)
    offset = reward_ckpt.get("score_offset") or 0.0
    return networks, tok, settings, ckpt, offset


def check_shapes(settings, proc, policy, tok, items):
    """The batch sizes split evenly over the processes; every prompt and answer fit the context."""
    for name, size in (("--rollout-batch", settings.rollout_batch),
                       ("--minibatch", settings.minibatch)):
        if size % proc.world_size:
            raise UserError(f"{name} {size} must be a multiple of the {proc.world_size} processes")
    longest = max(len(tok.render_chat(it["messages"], for_completion=True)[0]) for it in items)
    if longest + settings.max_new_tokens > policy.config.block_size:
        raise UserError(f"a PPO prompt of {longest} tokens + --max-new-tokens "
                        f"{settings.max_new_tokens} exceeds the policy's context of "
                        f"{policy.config.block_size} tokens")


def final_evaluation(args, settings, networks, tok, proc, started):
    """eval.json: SFT and PPO side by side, sampled and greedy (greedy: split by the audit), and
    the seconds since this process started (a resumed run: since its resume)."""
    known = carry_knowledge(settings.init_from, args.out_dir)
    result = {"stage": "ppo", "preset": settings.preset, "updates": settings.updates,
              "device": proc.device,
              **policy_against_sft("ppo", networks.policy, networks.reference, tok, known,
                                   temperature=settings.temperature,
                                   max_new_tokens=settings.max_new_tokens, seed=settings.seed,
                                   sft_dir=settings.init_from, proc=proc)}
    result["wall_seconds"] = round(time.time() - started, 1)
    write_json(os.path.join(args.out_dir, "eval.json"), result)
    print(json.dumps(result["sampled"], indent=1))


if __name__ == "__main__":
    main()
