"""The building blocks that moving a policy with its own answers needs, whatever the method.

PPO (ppo.py) uses all of them but kl_k3, GRPO (grpo.py) all but whiten; they serve any method
that samples answers from a policy and compares its log-probs with a frozen reference's:

- rollout: one answer per prompt, sampled with the KV cache, as a batch of tensors;
- answer_logprobs, logprobs_and_entropy: log pi(answer token | prompt, answer so far), without
  and with gradients (the reference's through the same function);
- answer_texts: the answers as text, for the reward model or the teacher;
- minibatches: passes over a rollout in shuffled minibatches, for the learning step;
- kl_k1, kl_k3: per-token estimators of KL(policy || reference) from the sampled tokens;
- masked_mean, whiten: statistics over the real answer tokens only, never the padding.

A batch (what `rollout` returns) lays prompts and answers out so that every answer starts at the
same column L: prompts left-padded to L, answers right-padded to R tokens. Shapes below: B
answers, L prompt columns, R answer columns.
"""
import torch

from training import Process, autocast, mean_over_processes

ONE_PROCESS = Process(rank=0, world_size=1, device="cpu", dtype=torch.float32)
# The score of an answer cut before its end-of-turn token, in place of the reward model's: a
# fixed penalty (N+ details), so that a policy never learns to ramble past the end.
NO_END_PENALTY = -1.0


@torch.no_grad()
def rollout(policy, tok, items, *, max_new_tokens, temperature, seed, proc=ONE_PROCESS):
    """Sample one answer per prompt item at `temperature` (no top-k or top-p: the log-probs then
    describe what was drawn). Returns a dict: `ids` (B, L + R) the prompts left-padded to L and
    the answers right-padded to R; `pad` (B,) left-padding counts; `mask` (B, R) 1 on answer
    tokens up to and including the stop token; `ended` (B,) whether the answer stopped with
    <|end|>; and `prompt_len` L."""
    end = tok.special("<|end|>")
    device = policy.embed_tokens.weight.device
    prompts = [tok.render_chat(it["messages"], for_completion=True)[0] for it in items]
    with autocast(proc.device, proc.dtype):
        steps = list(policy.stream(prompts, max_new_tokens, temperature=temperature,
                                   stop_ids=[end, tok.eot_id], seed=seed, pad_id=tok.pad_id))
    answers = torch.stack(steps, 1) if steps else torch.zeros(len(items), 0, dtype=torch.long)
    answers = answers.to(device)
    prompt_len = max(map(len, prompts))
    pad = torch.tensor([prompt_len - len(p) for p in prompts], device=device)
    left = torch.tensor([[tok.pad_id] * (prompt_len - len(p)) + p for p in prompts],
                        device=device)
    stops = (answers == end) | (answers == tok.eot_id)
    after_stop = (stops.long().cumsum(1) - stops.long()) > 0  # tokens after the first stop
    mask = (~after_stop).float()
    ended = ((answers == end) & ~after_stop).any(1)
    return {"ids": torch.cat([left, answers], 1), "pad": pad, "mask": mask, "ended": ended,
            "prompt_len": prompt_len}


def minibatches(batch, rollout_values, *, epochs, size, rng):
    """`epochs` passes over a rollout in shuffled minibatches of `size` answers, each pass in a
    fresh order drawn from `rng`: yields (part, old), the batch's rows (ids, pad, mask,
    prompt_len) and the same rows of each rollout_values tensor (its first dimension B)."""
    for _ in range(epochs):
        order = torch.randperm(len(batch["ids"]), generator=rng).tolist()
        for i in range(0, len(order), size):
            rows = order[i:i + size]
            part = {"ids": batch["ids"][rows], "pad": batch["pad"][rows],
                    "mask": batch["mask"][rows], "prompt_len": batch["prompt_len"]}
            yield part, {name: tensor[rows] for name, tensor in rollout_values.items()}


def answer_logprobs(model, batch, temperature):
    """log pi(answer token t | prompt, answer[:t]) at the sampling temperature: (B, R)."""
    start = batch["prompt_len"] - 1  # the logits at the prompt's last token predict the first
    return model.token_logprobs(batch["ids"], pad=batch["pad"], temperature=temperature)[:, start:]


def logprobs_and_entropy(policy, batch, temperature):
    """The training forward: answer_logprobs with gradients (B, R), and the policy's entropy at
    each answer position (B, R; from the same logits, detached, for the log)."""
    prompt_len = batch["prompt_len"]
    logits, _ = policy(batch["ids"], pad=batch["pad"])
    logprobs = (logits[:, prompt_len - 1:-1].float() / temperature).log_softmax(-1)
    chosen = logprobs.gather(-1, batch["ids"][:, prompt_len:, None]).squeeze(-1)
    return chosen, -(logprobs.exp() * logprobs).sum(-1).detach()


def answer_texts(tok, batch):
    """Each answer's text: its real tokens, without the stop token (<|end|> or <|endoftext|>)."""
    stops = {tok.special("<|end|>"), tok.eot_id}
    texts = []
    answers = batch["ids"][:, batch["prompt_len"]:].tolist()
    for row, keep in zip(answers, batch["mask"].tolist()):
        kept = [token for token, on in zip(row, keep) if on]
        texts.append(tok.decode_turn(kept[:-1] if kept and kept[-1] in stops else kept))
    return texts


def kl_k1(logprobs, ref_logprobs):
    """KL(policy || reference) estimated per sampled token: log pi - log pi_ref (B, R). Unbiased,
    but a single token's estimate can be negative; summed over an answer it is the sequence's."""
    return logprobs - ref_logprobs


def kl_k3(logprobs, ref_logprobs):
    """The k3 estimator per sampled token (B, R): r - 1 - log r with r = pi_ref / pi. Unbiased
    too, never negative, and of lower variance where the two are close (Schulman, "Approximating
    KL divergence", 2020); GRPO's KL penalty."""
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


def masked_mean(x, mask):
    """The mean of x over the positions where mask is 1 (a scalar)."""
    return (x * mask).sum() / mask.sum()


def whiten(x, mask, proc=ONE_PROCESS):
    """(x - mean) / std over the real tokens of the batch, every process's share; 0 on padding."""
    n = mean_over_processes(mask.sum(), proc)  # means over processes: their ratio is the
    mean = mean_over_processes((x * mask).sum(), proc) / n  # ratio of the sums
    var = mean_over_processes(((x - mean) ** 2 * mask).sum(), proc) / n
    return (x - mean) * torch.rsqrt(var + 1e-8) * mask
