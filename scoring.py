"""How a reward model scores an answer: what it reads, and the score it gives.

A reward model (reward.py) reads a whole chat, the prompt and one answer, and gives one number:
its output at the answer's last token. Every reader of a reward model goes through here: the
reward model's own training and evaluation (reward.py, evaluation.evaluate_reward_model), the
policy stages' rewards (ppo.py, grpo.py: reward_model_scores), the over-optimisation
experiment, and `sample.py --score-with` and serve.py (RewardScorer, one answer at a time).
"""
import sys

import torch

from checkpoints import load_checkpoint
from data.comparisons import pairs_of
from ground import UserError
from rl import answer_texts


def answer_ids(tok, messages, text, ended):
    """What a reward model reads: the chat prompt, the answer, and <|end|> if the answer ended
    (its score is read at the last of these tokens)."""
    ids = tok.render_chat(messages, for_completion=True)[0] + tok.encode_turn(text)
    return ids + [tok.special("<|end|>")] if ended else ids


def right_padded(sequences, pad_id, device):
    """(B, T) ids right-padded to the longest, and each row's last real position (B,). Causal
    attention keeps the padding out of every real position, so no attention mask is needed."""
    longest = max(map(len, sequences))
    ids = torch.tensor([s + [pad_id] * (longest - len(s)) for s in sequences], device=device)
    return ids, torch.tensor([len(s) - 1 for s in sequences], device=device)


def encode_comparisons(tok, rows, block_size):
    """What a model learns a ranking from (reward.py, dpo.py): for each row that has a pair, the
    token sequences of its K answers (answer_ids) and its pairs (data/comparisons.pairs_of:
    (better, worse) indices); and counts: pairs, ties, rows without a pair. A sequence longer
    than the context is an error naming its row."""
    examples = []
    counts = {"pairs": 0, "ties": 0, "rows_without_pairs": 0}
    for row in rows:
        seqs = [answer_ids(tok, row["messages"], text, ended)
                for text, ended in zip(row["responses"], row["ended"])]
        if max(map(len, seqs)) > block_size:
            raise UserError(f"{row['where']}: {max(map(len, seqs))} tokens, longer than the "
                            f"context of {block_size}: shorten the prompt or the answers")
        pairs, ties = pairs_of(row)
        counts["pairs"] += len(pairs)
        counts["ties"] += ties
        counts["rows_without_pairs"] += not pairs
        if pairs:
            examples.append((seqs, pairs))
    return examples, counts


def pair_indices(examples, device):
    """Where each pair of encode_comparisons' examples lies once all their answers are laid out
    in one batch, example after example: (better, worse, weight), each (P,) for P pairs; weight
    1 / (the example's pairs), so that a sum over pairs is a sum over prompts of their mean."""
    better = []
    worse = []
    weight = []
    start = 0
    for answers, pairs in examples:
        better += [start + b for b, _ in pairs]
        worse += [start + w for _, w in pairs]
        weight += [1.0 / len(pairs)] * len(pairs)
        start += len(answers)
    return (torch.tensor(better, device=device), torch.tensor(worse, device=device),
            torch.tensor(weight, device=device))


@torch.no_grad()
def reward_scores(model, sequences, pad_id, device, offset=0.0, batch_size=64):
    """The reward model's score of each token sequence (answer_ids), minus `offset` (the mean
    score of the SFT model's answers, stored in a reward checkpoint): a list of floats."""
    training = model.training
    scores = []
    model.eval()
    for i in range(0, len(sequences), batch_size):
        ids, last = right_padded(sequences[i:i + batch_size], pad_id, device)
        scores += (model(ids)[torch.arange(len(ids), device=device), last] - offset).tolist()
    model.train(training)
    return scores


def reward_model_scores(reward_model, offset, no_end_penalty):
    """A policy run's score function (ppo.py, grpo.py): score_fn(tok, items, batch) ->
    (scores (B,), texts) of a rollout's answers (rl.rollout) with this reward model."""
    def score_fn(tok, items, batch):
        return rollout_scores(reward_model, tok, items, batch, offset=offset,
                              no_end_penalty=no_end_penalty)
    return score_fn


def rollout_scores(reward_model, tok, items, batch, *, offset, no_end_penalty):
    """The reward model's score of each answer of a rollout (B,), its offset subtracted (0 = an
    average SFT answer), or no_end_penalty for an answer that never ended; and the answers'
    texts."""
    device = batch["ids"].device
    texts = answer_texts(tok, batch)
    seqs = [answer_ids(tok, it["messages"], text, ended)
            for it, text, ended in zip(items, texts, batch["ended"].tolist())]
    scores = torch.tensor(reward_scores(reward_model, seqs, tok.pad_id, device, offset),
                          device=device)
    return torch.where(batch["ended"], scores, torch.full_like(scores, no_end_penalty)), texts


class RewardScorer:
    """A reward checkpoint that scores one answer as a reply to a request (a base model's
    continuation too, as if it were the assistant's answer), relative to the SFT model's mean."""

    def __init__(self, ckpt_dir, device, flag):
        self.model, self.tok, ckpt = load_checkpoint(ckpt_dir, ["reward"], device, flag)
        self.offset = ckpt.get("score_offset", 0.0)
        self.device = device
        self.flag = flag
        if "score_offset" not in ckpt:
            print(f"note: {ckpt_dir} has no score offset yet (its run has not finished): scores "
                  "are not centred on the SFT model's mean", file=sys.stderr)

    def __call__(self, messages, text, ended, tok):
        if tok.checksum != self.tok.checksum:
            raise UserError(f"{self.flag}: the reward model has another tokenizer than the "
                            "checkpoint it scores")
        try:
            ids = answer_ids(tok, messages, text.strip() or "...", ended)
        except ValueError as e:
            raise UserError(f"prompt: {e}") from None
        ids = ids[-self.model.config.block_size:]  # a long conversation: its most recent part
        return reward_scores(self.model, [ids], tok.pad_id, self.device, self.offset)[0]
