"""Stage 4: PPO moves the instruct model toward answers the reward model scores high (RLHF, half 2).

    python ppo.py                       # out/sft + out/reward -> out/ppo
    python ppo.py --preset tiny --init-from out/tiny/sft --reward-model out/tiny/reward
    torchrun --standalone --nproc_per_node=8 ppo.py --preset gpu  # a share of each rollout each

Four networks:
  policy     the model being trained, initialised from the SFT model;
  reference  a frozen copy of the SFT model: the KL penalty keeps the policy near it;
  reward     the frozen reward model (reward.py), with its SFT-mean offset;
  critic     a scalar-head model initialised from the reward model: the value of each prefix.

One update, in the order of the functions below:
1. rollout: prompts of the PPO pool (data/chats.rl_prompts("ppo"), not the reward model's) answered
   with the KV cache at one temperature, no top-k or top-p (the log-probs describe what is drawn).
2. rewards: per answer token, -kl_coef * (log pi - log pi_ref); on the last real token, plus the
   reward model's score (or no_end_penalty for an answer cut before its end-of-turn token).
3. advantages: GAE (gamma, lambda) over the answer tokens, whitened over the batch's real tokens;
   returns = advantages + values, the critic's targets.
4. learn: ppo_epochs passes over minibatches: the clipped policy ratio, the clipped value loss.
"""
import copy
import json
import os
import time
from dataclasses import asdict, dataclass

import torch
from tqdm import tqdm

from common import (MetricsLog, Process, UserError, autocast, barrier, check_finite, check_out_dir,
                    check_weights, gather_lists, launch, load_checkpoint, mean_over_processes,
                    nonnegative, parse_stage_args, prepare_out_dir, resolve_settings,
                    save_checkpoint, seed_arg, setting, wrap_model, write_json)
from data import chats, comparisons
from evaluation import answer_ids, carry_knowledge, evaluate_instruct, gold_stats, reward_scores
from model import ScalarHeadGPT


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
    gamma: float = setting(1.0, "discount over answer tokens (N+ details: 1)")
    lam: float = setting(0.95, "GAE lambda (N+ details: 0.95)")
    no_end_penalty: float = setting(-1.0, "score of an answer with no end-of-turn token, in place "
                                          "of the reward model's (N+ details: a fixed penalty)",
                                   float)
    grad_clip: float = setting(1.0, "max gradient norm of each network")
    save_every: int = setting(5, "updates between checkpoints (policy, critic, optimizers)")
    seed: int = setting(1337, "prompts, sampling, minibatch order", seed_arg)
    preset: str = "cpu"


PRESETS = {
    "tiny": dict(updates=4, rollout_batch=16, minibatch=8, ppo_epochs=2, max_new_tokens=16,
                 lr=1e-4),
    "cpu": dict(ppo_epochs=2, lr=2e-5),  # half the passes, twice the step: learning was 3/4
    "gpu": dict(updates=200, rollout_batch=256, minibatch=64, max_new_tokens=48, lr=3e-6),
}


# ----------------------------------------------------------------------------- 1. rollout
ONE_PROCESS = Process(rank=0, world_size=1, device="cpu", dtype=torch.float32)


@torch.no_grad()
def rollout(policy, tok, items, s, seed, proc=ONE_PROCESS):
    """Sample one answer per prompt. Returns a dict of tensors over the batch: `ids` (B, L + R),
    the prompts left-padded to L and the answers right-padded to R; `pad` (B,) left-padding
    counts; `mask` (B, R) 1 on answer tokens up to and including the stop token; `ended` (B,)
    whether the answer stopped with <|end|>; and `prompt_len` L."""
    end, device = tok.special("<|end|>"), policy.embed_tokens.weight.device
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    with autocast(proc.device, proc.dtype):
        steps = list(policy.stream(prompts, s.max_new_tokens, temperature=s.temperature,
                                   stop_ids=[end, tok.eot_id], seed=seed, pad_id=tok.pad_id))
    answers = torch.stack(steps, 1) if steps else torch.zeros(len(items), 0, dtype=torch.long)
    answers = answers.to(device)
    L = max(map(len, prompts))
    pad = torch.tensor([L - len(p) for p in prompts], device=device)
    left = torch.tensor([[tok.pad_id] * (L - len(p)) + p for p in prompts], device=device)
    stops = (answers == end) | (answers == tok.eot_id)
    after_stop = (stops.long().cumsum(1) - stops.long()) > 0  # tokens after the first stop
    mask = (~after_stop).float()
    ended = ((answers == end) & ~after_stop).any(1)
    return {"ids": torch.cat([left, answers], 1), "pad": pad, "mask": mask, "ended": ended,
            "prompt_len": L}


def answer_logprobs(model, batch, temperature):
    """log pi(answer token t | prompt, answer[:t]) at the sampling temperature: (B, R)."""
    L = batch["prompt_len"]
    return model.token_logprobs(batch["ids"], pad=batch["pad"], temperature=temperature)[:, L - 1:]


def logprobs_and_entropy(policy, batch, temperature):
    """The training forward: answer_logprobs with gradients, and the policy's entropy at each
    answer position (from the same logits, for the log)."""
    L = batch["prompt_len"]
    logits, _ = policy(batch["ids"], pad=batch["pad"])
    logprobs = (logits[:, L - 1:-1].float() / temperature).log_softmax(-1)
    chosen = logprobs.gather(-1, batch["ids"][:, L:, None]).squeeze(-1)
    return chosen, -(logprobs.exp() * logprobs).sum(-1).detach()


def answer_values(critic, batch):
    """The critic's value of each answer prefix, read at the token before each answer token."""
    L, R = batch["prompt_len"], batch["mask"].shape[1]
    return critic(batch["ids"], pad=batch["pad"])[:, L - 1:L - 1 + R]


# ----------------------------------------------------------------------------- 2. rewards
def rewards(logprobs, ref_logprobs, scores, mask, kl_coef):
    """Per-token rewards (B, R): -kl_coef * (log pi - log pi_ref) on every answer token, plus
    each answer's score on its last real token. Zero on padding."""
    out = -kl_coef * (logprobs - ref_logprobs) * mask
    last = (mask.sum(1).long() - 1).clamp(min=0)
    out[torch.arange(len(out), device=out.device), last] += scores
    return out * mask


def answer_texts(tok, batch):
    """Each answer's text: its real tokens, without the stop token (<|end|> or <|endoftext|>)."""
    L, stops, texts = batch["prompt_len"], {tok.special("<|end|>"), tok.eot_id}, []
    for row, m in zip(batch["ids"][:, L:].tolist(), batch["mask"].tolist()):
        real = [t for t, keep in zip(row, m) if keep]
        texts.append(tok.decode_turn(real[:-1] if real and real[-1] in stops else real))
    return texts


def scores_of(reward_model, tok, items, batch, offset, no_end_penalty):
    """The reward model's score of each answer (its offset subtracted: 0 = an average SFT answer),
    or no_end_penalty for an answer that never ended."""
    device, texts = batch["ids"].device, answer_texts(tok, batch)
    seqs = [answer_ids(tok, it["messages"], text, ended)
            for it, text, ended in zip(items, texts, batch["ended"].tolist())]
    scores = torch.tensor(reward_scores(reward_model, seqs, tok.pad_id, device, offset),
                          device=device)
    return torch.where(batch["ended"], scores, torch.full_like(scores, no_end_penalty)), texts


# ----------------------------------------------------------------------------- 3. advantages
def gae(token_rewards, values, mask, gamma, lam):
    """Generalised advantage estimation over answer tokens, backwards from the last: delta_t =
    r_t + gamma * V_{t+1} - V_t (V after the last real token is 0), A_t = delta_t + gamma * lam *
    A_{t+1}. Returns (advantages, returns = advantages + values), zero on padding."""
    advantages = torch.zeros_like(token_rewards)
    next_value = torch.zeros(len(values), device=values.device)
    next_advantage = torch.zeros_like(next_value)
    for t in reversed(range(token_rewards.shape[1])):
        m = mask[:, t]
        delta = token_rewards[:, t] + gamma * next_value - values[:, t]
        advantage = delta + gamma * lam * next_advantage
        advantages[:, t] = advantage * m
        next_value = torch.where(m > 0, values[:, t], next_value)  # padding passes nothing back
        next_advantage = torch.where(m > 0, advantage, next_advantage)
    return advantages, (advantages + values) * mask


def whiten(x, mask, proc=ONE_PROCESS):
    """(x - mean) / std over the real tokens of the batch, every process's share; 0 on padding."""
    n = mean_over_processes(mask.sum(), proc)  # means over processes: their ratio is the
    mean = mean_over_processes((x * mask).sum(), proc) / n  # ratio of the sums
    var = mean_over_processes(((x - mean) ** 2 * mask).sum(), proc) / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask


def masked_mean(x, mask):
    return (x * mask).sum() / mask.sum()


# ----------------------------------------------------------------------------- 4. learn
def ppo_losses(new_logprobs, old_logprobs, advantages, new_values, old_values, returns, mask, s):
    """(policy loss, value loss, stats) of one minibatch: the clipped surrogate objective and the
    clipped value loss, each a mean over real answer tokens."""
    log_ratio = new_logprobs - old_logprobs
    ratio = log_ratio.exp()
    policy_loss = masked_mean(torch.max(-advantages * ratio, -advantages * ratio.clamp(
        1 - s.clip_ratio, 1 + s.clip_ratio)), mask)
    clipped = old_values + (new_values - old_values).clamp(-s.clip_value, s.clip_value)
    value_loss = 0.5 * masked_mean(torch.max((new_values - returns) ** 2,
                                             (clipped - returns) ** 2), mask)
    with torch.no_grad():
        stats = {"approx_kl": masked_mean(ratio - 1 - log_ratio, mask).item(),
                 "clip_fraction": masked_mean(((ratio - 1).abs() > s.clip_ratio).float(),
                                              mask).item(),
                 "ratio": masked_mean(ratio, mask).item()}
    return policy_loss, value_loss, stats


def explained_variance(values, returns, mask):
    """1 - Var(returns - values) / Var(returns) over real tokens: 1 is a perfect critic."""
    var = masked_mean((returns - masked_mean(returns, mask)) ** 2, mask)
    resid = returns - values
    return (1 - masked_mean((resid - masked_mean(resid, mask)) ** 2, mask) / var).item()


def learn(learners, optim, batch, old, s, step, proc, rng):
    """ppo_epochs passes over this process's rollout in shuffled minibatches (its share of
    s.minibatch). old: the rollout's logprobs, values, advantages, returns. Returns the mean of
    each statistic over the gradient steps."""
    policy, critic = learners
    totals, steps = {}, 0
    rows_per_step = s.minibatch // proc.world_size
    for _ in range(s.ppo_epochs):
        order = torch.randperm(len(batch["ids"]), generator=rng).tolist()
        for i in range(0, len(order), rows_per_step):
            rows = order[i:i + rows_per_step]
            part = {"ids": batch["ids"][rows], "pad": batch["pad"][rows],
                    "mask": batch["mask"][rows], "prompt_len": batch["prompt_len"]}
            mask = part["mask"]
            with autocast(proc.device, proc.dtype):
                logprobs, entropy = logprobs_and_entropy(policy, part, s.temperature)
                values = answer_values(critic, part).float()
            policy_loss, value_loss, stats = ppo_losses(
                logprobs, old["logprobs"][rows], old["advantages"][rows], values,
                old["values"][rows], old["returns"][rows], mask, s)
            losses = mean_over_processes(torch.stack([policy_loss, value_loss]).detach(), proc)
            check_finite(step + 1, policy_loss=losses[0].item(), value_loss=losses[1].item())
            stats.update(policy_loss=policy_loss.item(), value_loss=value_loss.item(),
                         entropy=masked_mean(entropy, mask).item(),
                         **optimizer_steps(learners, optim, policy_loss + s.value_coef *
                                           value_loss, s.grad_clip))
            for k, v in stats.items():
                totals[k] = totals.get(k, 0.0) + v
            steps += 1
    return {k: v / steps for k, v in totals.items()}


def optimizer_steps(learners, optim, loss, grad_clip):
    """Backward through both networks (DDP averages the gradients over processes), clip each
    network's gradients, step both optimizers. Returns the gradient norms before clipping."""
    opts, scaler = optim  # scaler: enabled for fp16 only
    scaler.scale(loss).backward()
    norms = {}
    for name, model, opt in zip(("policy", "critic"), learners, opts):
        scaler.unscale_(opt)
        norms[f"grad_norm_{name}"] = torch.nn.utils.clip_grad_norm_(model.parameters(),
                                                                    grad_clip).item()
        scaler.step(opt)
        opt.zero_grad(set_to_none=True)
    scaler.update()
    return norms


def update(models, learners, optim, tok, items, s, step, proc, score_fn):
    """One PPO update, each process on its share of `items`: rollout, rewards, advantages,
    learning. Returns its log line: statistics over all processes."""
    policy, reference, _, critic = models  # no dropout anywhere: train and eval mode are one
    items = items[proc.rank::proc.world_size]
    t0 = time.time()
    batch = rollout(policy, tok, items, s, s.seed + step * proc.world_size + proc.rank, proc)
    t1 = time.time()
    with torch.no_grad(), autocast(proc.device, proc.dtype):
        logprobs = answer_logprobs(policy, batch, s.temperature)
        ref_logprobs = answer_logprobs(reference, batch, s.temperature)
        values = answer_values(critic, batch).float()
    scores, texts = score_fn(tok, items, batch)
    mask = batch["mask"]
    token_rewards = rewards(logprobs, ref_logprobs, scores, mask, s.kl_coef)
    advantages, returns = gae(token_rewards, values, mask, s.gamma, s.lam)
    advantages = whiten(advantages, mask, proc)
    t2 = time.time()
    minibatch_order = torch.Generator().manual_seed((s.seed * 100_003 + step) * 1024 + proc.rank)
    stats = learn(learners, optim, batch, {"logprobs": logprobs, "values": values,
                                           "advantages": advantages, "returns": returns},
                  s, step, proc, minibatch_order)
    stats.update(score=scores.mean().item(), kl=((logprobs - ref_logprobs) * mask).sum(1).mean()
                 .item(), length=mask.sum(1).mean().item(),
                 end_rate=batch["ended"].float().mean().item(),
                 explained_variance=explained_variance(values, returns, mask),
                 seconds_rollout=t1 - t0, seconds_scoring=t2 - t1,
                 seconds_learning=time.time() - t2)
    stats = dict(zip(stats, mean_over_processes(torch.tensor(
        list(stats.values()), device=proc.device), proc).tolist()))
    texts, ended = gather_lists(texts, proc), gather_lists(batch["ended"].tolist(), proc)
    return {"step": step + 1, **stats, **gold_stats(gather_lists(items, proc), texts, ended),
            "examples": texts[:2]}


def train(models, tok, s, proc=ONE_PROCESS, score_fn=None, offset=0.0, log=print, ckpt=None,
          save=None, stop=None, compile_=False, items=None):
    """PPO updates on `items` (default: prompt_pool(s)), from the start or from a checkpoint's
    state, up to `stop` (default s.updates). save(step, optim): called every s.save_every updates
    and at the end. Returns the log lines."""
    policy, _, reward_model, critic = models
    score_fn = score_fn or (lambda tok, items, batch: scores_of(  # the reward model's, by default
        reward_model, tok, items, batch, offset, s.no_end_penalty))
    torch.manual_seed(s.seed)
    learners = [wrap_model(m, compile_, proc, policy.config.block_size) for m in (policy, critic)]
    opts = [torch.optim.Adam(m.parameters(), lr=s.lr, eps=s.adam_eps) for m in (policy, critic)]
    scaler = torch.amp.GradScaler(proc.device.split(":")[0], enabled=proc.dtype == torch.float16)
    start = 0
    if ckpt is not None:  # the optimizers' moments go on as they were
        for opt, state in zip(opts, ckpt["optimizers"]):
            opt.load_state_dict(state)
        if ckpt.get("scaler") and scaler.is_enabled():
            scaler.load_state_dict(ckpt["scaler"])
        start = ckpt["step"]
    items = items or prompt_pool(s)
    lines = []
    for step in range(start, stop or s.updates):
        for opt in opts:  # linear decay to 0 over the run (N+ details)
            for group in opt.param_groups:
                group["lr"] = s.lr * (1 - step / s.updates)
        part = items[step * s.rollout_batch:(step + 1) * s.rollout_batch]
        lines.append(update(models, learners, (opts, scaler), tok, part, s, step, proc, score_fn))
        log(lines[-1])
        if save and ((step + 1) % s.save_every == 0 or step + 1 == (stop or s.updates)):
            save(step + 1, (opts, scaler))
    return lines


def prompt_pool(s):
    """Every prompt of the run, in order: the bundled PPO pool, or --prompts-file cycled."""
    if not s.prompts_file:
        return chats.rl_prompts("ppo", seed=s.seed, n=s.updates * s.rollout_batch)
    items = comparisons.read_prompts(s.prompts_file)
    return [items[i % len(items)] for i in range(s.updates * s.rollout_batch)]


# ----------------------------------------------------------------------------- the run
def main(argv=None):
    launch(run, parse_stage_args(argv, __doc__, Settings, PRESETS, "out/ppo"))


def load_models(a, proc):
    """(policy, reference, reward model, critic), tokenizer, settings, the run's checkpoint
    (None for a new run), the reward model's offset."""
    ckpt = None
    if a.resume:
        policy, tok, ckpt = load_checkpoint(a.out_dir, ["ppo"], proc.device, "--resume")
        s = resolve_settings(Settings, PRESETS, a, proc.device, ckpt["config"])
    else:
        s = resolve_settings(Settings, PRESETS, a, proc.device)
        check_out_dir(a.out_dir, resume=False, source=s.init_from)
    sft, sft_tok, _ = load_checkpoint(s.init_from, ["sft", "ppo"], proc.device, "--init-from")
    reward_model, reward_tok, reward_ckpt = load_checkpoint(s.reward_model, ["reward"], proc.device,
                                                            "--reward-model")
    if ckpt is None:
        policy, tok = copy.deepcopy(sft), sft_tok
    if len({tok.checksum, sft_tok.checksum, reward_tok.checksum}) > 1:
        raise UserError(f"--init-from {s.init_from}, --reward-model {s.reward_model} and the run "
                        "use different tokenizers")
    if None not in (sft.base_id, reward_model.base_id) and sft.base_id != reward_model.base_id:
        raise UserError(f"--reward-model {s.reward_model} descends from another base model than "
                        f"--init-from {s.init_from} (train it from that SFT model: reward.py)")
    torch.manual_seed(s.seed)  # for a fresh value head (on a likelihood reward model's trunk)
    critic = ScalarHeadGPT.from_reward_model(reward_model)  # the reward head, or a fresh one ...
    if ckpt is not None:
        critic.load_state_dict(ckpt["critic"])  # ... or where the run left it
    reference = sft.eval().requires_grad_(False)
    reward_model.eval().requires_grad_(False)
    offset = reward_ckpt.get("score_offset") or 0.0
    return (policy, reference, reward_model, critic), tok, s, ckpt, offset


def check_shapes(s, proc, policy, tok, items):
    """The batch sizes split evenly over the processes; every prompt and answer fit the context."""
    for name, size in (("--rollout-batch", s.rollout_batch), ("--minibatch", s.minibatch)):
        if size % proc.world_size:
            raise UserError(f"{name} {size} must be a multiple of the {proc.world_size} processes")
    longest = max(len(tok.render_chat(it["messages"], for_completion=True)[0]) for it in items)
    if longest + s.max_new_tokens > policy.config.block_size:
        raise UserError(f"a PPO prompt of {longest} tokens + --max-new-tokens {s.max_new_tokens} "
                        f"exceeds the policy's context of {policy.config.block_size} tokens")


def run(a, proc):
    models, tok, s, ckpt, offset = load_models(a, proc)
    policy, reference, _, critic = models
    items = prompt_pool(s)  # read once: the shape checks and the run use the same
    check_shapes(s, proc, policy, tok, items)
    prepare_out_dir(a.out_dir, tok, resume=a.resume, write=proc.master)
    log = MetricsLog(os.path.join(a.out_dir, "log.jsonl"), proc.master,
                     resume_step=ckpt["step"] if ckpt is not None else None)
    bar = tqdm(total=s.updates, initial=ckpt["step"] if ckpt else 0, desc="ppo",
               dynamic_ncols=True, disable=not proc.master)
    probe = torch.tensor([[tok.eot_id]], device=proc.device)  # for check_weights

    def show(line):
        log.write(**{k: v for k, v in line.items() if k != "examples"})
        bar.update(1)
        bar.set_postfix({k: round(line[k], 3) for k in ("score", "gold_score", "kl") if k in line})

    def save(step, optim):
        check_weights(policy, probe, step)
        if proc.master:
            save_checkpoint(a.out_dir, "ppo", policy, tok, config=asdict(s), step=step,
                            critic=critic.state_dict(),
                            optimizers=[o.state_dict() for o in optim[0]],
                            scaler=optim[1].state_dict() if optim[1].is_enabled() else None)
        barrier(proc)

    train(models, tok, s, proc, offset=offset, log=show, ckpt=ckpt, save=save, stop=a.stop_at,
          compile_=a.compile, items=items)
    bar.close()
    if proc.master and (a.stop_at or s.updates) >= s.updates:
        final_evaluation(a, s, policy, reference, tok, proc)
    barrier(proc)


def final_evaluation(a, s, policy, reference, tok, proc):
    """eval.json: SFT and PPO side by side, sampled and greedy (greedy: split by the audit)."""
    known, runs = carry_knowledge(s.init_from, a.out_dir), {"sft": reference, "ppo": policy}
    result = {"stage": "ppo", "preset": s.preset, "updates": s.updates, "device": proc.device,
              "sampled": {k: sampled_heldout(m, reference, tok, s, proc) for k, m in runs.items()},
              **{k: evaluate_instruct(m, tok, known) for k, m in runs.items()}}
    write_json(os.path.join(a.out_dir, "eval.json"), result)
    print(json.dumps(result["sampled"], indent=1))


@torch.no_grad()
def sampled_heldout(model, reference, tok, s, proc=ONE_PROCESS):
    """The model's sampled answers (as in training) to the held-out questions and claims:
    evaluation.gold_stats, end-of-turn rate, length, and KL(model || SFT), summed over answer
    tokens."""
    items = chats.eval_prompts("heldout") + chats.claim_prompts("heldout")
    model.eval()
    batch = rollout(model, tok, items, s, s.seed, proc)
    mask = batch["mask"]
    kl = ((answer_logprobs(model, batch, s.temperature)
           - answer_logprobs(reference, batch, s.temperature)) * mask).sum(1)
    return {**gold_stats(items, answer_texts(tok, batch), batch["ended"].tolist()),
            "end_of_turn_rate": batch["ended"].float().mean().item(),
            "mean_length_tokens": mask.sum(1).mean().item(), "kl_to_sft": kl.mean().item()}


if __name__ == "__main__":
    main()
