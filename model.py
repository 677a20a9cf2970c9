"""The GPT: a Llama-style decoder-only transformer, its KV cache and batched sampling.

Every stage of the project (base, SFT, reward model, PPO policy and critic) is this one network.
The architecture is the modern default: RMSNorm before each block, rotary position embeddings
(RoPE), a SwiGLU MLP, no biases, optional grouped-query attention (GQA: fewer key/value heads
than query heads). Parameter names follow Hugging Face's LlamaForCausalLM so that export.py
is a plain copy and tests/test_model.py can prove parity against `transformers`.

The language model (`GPT`) gives next-token logits, the per-token log-probabilities of given
tokens (PPO's policy and reference) and the hidden states every head reads; `ScalarHeadGPT` is
the same trunk with one number per position (the reward model, PPO's critic);
`LikelihoodRewardGPT` keeps the language model whole and scores an answer by its likelihood
(the reward model of `reward.py --score likelihood`).

Sampling is batched: prompts of different lengths are left-padded into one batch and every row
carries its own positions, so row i never sees row j's padding (PPO rollouts rely on this).
"""
import copy
import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class GPTConfig:
    vocab_size: int = 4096
    block_size: int = 256     # context length in tokens
    n_layer: int = 4
    n_head: int = 4
    n_kv_head: int = 4        # < n_head gives grouped-query attention
    n_embd: int = 256
    ffn_hidden: int = 0       # 0: about 8/3 * n_embd rounded up to a multiple of 64 (Llama's rule)
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    def __post_init__(self):
        if self.block_size < 2:
            raise ValueError(f"block_size {self.block_size}: a context holds at least a prompt "
                             "token and a generated one")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd {self.n_embd} is not a multiple of n_head {self.n_head}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head {self.n_head} is not a multiple of n_kv_head "
                             f"{self.n_kv_head}")
        if (self.n_embd // self.n_head) % 2:
            raise ValueError(f"the head size n_embd/n_head = {self.n_embd // self.n_head} must be "
                             "even for rotary embeddings")
        if not self.ffn_hidden:
            self.ffn_hidden = 64 * math.ceil(8 * self.n_embd / 3 / 64)


def rotate_half(x):
    # RoPE in the "half split" layout (the one Llama/HF use): pairs are (x[i], x[i + d/2]).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


class Attention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)

    def forward(self, x, cos, sin, mask, cache, layer):
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # under autocast: keep q, k, cache in bf16
        q, k = q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin
        if cache is not None:  # append this step's keys/values, attend over everything so far
            k, v = cache.update(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None,
                                           enable_gqa=self.n_kv_head != self.n_head)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))  # SwiGLU


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x, cos, sin, mask, cache, layer):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask, cache, layer)
        return x + self.mlp(self.post_attention_layernorm(x))


class KVCache:
    """Keys and values of every layer for a batch, preallocated up to `max_len` positions.

    `pad[b]` counts the left-padding tokens of row b: those keys are never attended to, and a
    row's positions start at 0 on its first real token, as if it had been run alone.
    """

    def __init__(self, cfg: GPTConfig, pad: torch.Tensor, max_len: int):
        self.shape = (cfg.n_layer, pad.shape[0], cfg.n_kv_head, max_len, cfg.n_embd // cfg.n_head)
        self.k = self.v = None  # allocated on first use, in the dtype the layers produce
        self.pad, self.len = pad, 0  # len: positions filled so far (advanced by GPT.forward)

    def update(self, layer, k, v):
        if self.k is None:
            self.k = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
            self.v = torch.zeros(self.shape, dtype=k.dtype, device=k.device)
        T = k.shape[2]
        self.k[layer, :, :, self.len:self.len + T] = k
        self.v[layer, :, :, self.len:self.len + T] = v
        return self.k[layer, :, :, :self.len + T], self.v[layer, :, :, :self.len + T]


def padding_mask(pad, start, T, total):
    """Boolean attention mask (B, 1, T, total) for queries at slots start..start+T-1: causal, and
    blind to each row's left padding. A padding query sees itself, so no softmax row is empty."""
    q = torch.arange(start, start + T, device=pad.device)[:, None]
    k = torch.arange(total, device=pad.device)[None, :]
    real_key = k[None] >= pad[:, None, None]
    return ((real_key & (k <= q)) | (k == q)).unsqueeze(1)


class GPT(nn.Module):
    head = "lm"  # a checkpoint records it, so the loader builds the right class

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layer))
        self.norm = nn.RMSNorm(cfg.n_embd, eps=cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        hd = cfg.n_embd // cfg.n_head
        inv_freq = 1.0 / cfg.rope_theta ** (torch.arange(0, hd, 2).float() / hd)
        freqs = torch.outer(torch.arange(cfg.block_size).float(), inv_freq)
        freqs = torch.cat((freqs, freqs), dim=-1)
        self.register_buffer("cos", freqs.cos(), persistent=False)
        self.register_buffer("sin", freqs.sin(), persistent=False)
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # residual projections shrink with depth (GPT-2)
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m):
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)

    def num_params(self, non_embedding=True):
        n = sum(p.numel() for p in self.parameters())
        return n - self.embed_tokens.weight.numel() if non_embedding else n

    def flops_per_token(self):
        """Training FLOPs per token: 6 per weight (forward + backward) plus attention scores."""
        c = self.config
        return 6 * self.num_params() + 12 * c.n_layer * c.n_embd * c.block_size

    def hidden_states(self, idx, *, pad=None, cache=None):
        """The last layer's normalised hidden states (B, T, n_embd): what every head reads.

        pad: (B,) left-padding counts of the rows (None: no padding). cache: a KVCache that this
        call appends to (its own `pad` is used)."""
        T = idx.shape[1]
        start = cache.len if cache is not None else 0
        if cache is not None:
            pad = cache.pad
        if start + T > self.config.block_size:
            raise ValueError(f"sequence of {start + T} tokens exceeds the context length "
                             f"{self.config.block_size}")
        if pad is None:  # plain causal attention over one unpadded sequence per row
            cos, sin = self.cos[start:start + T], self.sin[start:start + T]
            mask = None
        else:
            pos = (torch.arange(start, start + T, device=idx.device) - pad[:, None]).clamp(min=0)
            cos, sin = self.cos[pos].unsqueeze(1), self.sin[pos].unsqueeze(1)
            mask = padding_mask(pad, start, T, start + T)
        x = self.embed_tokens(idx)
        for i, layer in enumerate(self.layers):
            x = layer(x, cos, sin, mask, cache, i)
        if cache is not None:
            cache.len += T
        return self.norm(x)

    def forward(self, idx, targets=None, *, pad=None, cache=None):
        """Logits (B, T, vocab), and the mean cross-entropy if `targets` is given (-1 = ignored)."""
        logits = self.lm_head(self.hidden_states(idx, pad=pad, cache=cache))
        if targets is None:
            return logits, None
        loss = F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.reshape(-1),
                               ignore_index=-1)
        return logits, loss

    def token_logprobs(self, idx, *, pad=None, temperature=1.0):
        """log p(idx[:, t] | idx[:, :t]) for t = 1 .. T-1, under logits / temperature: (B, T-1).

        The policy and the reference model of PPO score a sampled answer with this, at the
        temperature it was sampled with (otherwise the ratio and the KL compare two different
        distributions), and from samples drawn with neither top-k nor top-p (those change the
        distribution sampled from). Positions in a row's left padding hold meaningless values:
        mask them."""
        if not temperature > 0:
            raise ValueError(f"temperature {temperature}: log-probs need a temperature above 0")
        logits, _ = GPT.forward(self, idx, pad=pad)  # the next-token head's, whatever forward is
        logprobs = (logits[:, :-1].float() / temperature).log_softmax(-1)
        return logprobs.gather(-1, idx[:, 1:, None]).squeeze(-1)

    @torch.no_grad()
    def top_next_tokens(self, ids, k):
        """The k likeliest tokens to follow `ids` (a list of token ids), with their probabilities
        under the model's own softmax (temperature 1): [(token id, probability)], likeliest
        first. What the model "thinks" at one position, before any sampling choice."""
        logits, _ = self(torch.tensor([ids], device=self.embed_tokens.weight.device))
        probs = logits[0, -1].float().softmax(-1)
        top = probs.topk(min(k, probs.numel()))
        return list(zip(top.indices.tolist(), top.values.tolist()))

    @torch.no_grad()
    def stream(self, prompts, max_new_tokens, temperature=1.0, top_k=None, top_p=None,
               stop_ids=(), seed=None, pad_id=0, use_cache=True):
        """Sample continuations for a batch of prompts (lists of token ids, any lengths).

        Yields one (B,) tensor of new tokens per step. A row that has produced one of `stop_ids`
        is finished: its later tokens are `pad_id`. Stops when every row is finished.
        temperature 0 means greedy. use_cache=False recomputes the whole sequence every step
        (the slow reference the KV cache is tested and benchmarked against)."""
        device = self.embed_tokens.weight.device
        B, L = len(prompts), max(len(p) for p in prompts)
        if min(len(p) for p in prompts) == 0:
            raise ValueError("every prompt needs at least one token")
        if L + max_new_tokens > self.config.block_size:
            raise ValueError(f"prompt ({L} tokens) + {max_new_tokens} new tokens exceeds the "
                             f"context length {self.config.block_size}")
        pad = torch.tensor([L - len(p) for p in prompts], device=device)
        seq = torch.tensor([[pad_id] * (L - len(p)) + list(p) for p in prompts], device=device)
        gen = torch.Generator(device=device)
        if seed is None:
            gen.seed()  # fresh randomness, without touching torch's global RNG
        else:
            gen.manual_seed(seed)
        cache = KVCache(self.config, pad, L + max_new_tokens) if use_cache else None
        done = torch.zeros(B, dtype=torch.bool, device=device)
        stop = torch.tensor(list(stop_ids), dtype=torch.long, device=device)
        x = seq
        for _ in range(max_new_tokens):
            logits, _ = self(x, pad=pad, cache=cache)
            nxt = sample_next(logits[:, -1].float(), temperature, top_k, top_p, gen)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            done |= torch.isin(nxt, stop)
            yield nxt
            if done.all():
                return
            seq = torch.cat([seq, nxt[:, None]], dim=1)
            x = nxt[:, None] if use_cache else seq

    def generate(self, prompts, max_new_tokens, **kw):
        """Like `stream`, but returns each row's new tokens as a list, cut after its stop token."""
        steps = list(self.stream(prompts, max_new_tokens, **kw))
        stop_ids = set(kw.get("stop_ids", ()))
        out = []
        for row in (torch.stack(steps, 1).tolist() if steps else [[] for _ in prompts]):
            ends = [i for i, t in enumerate(row) if t in stop_ids]
            out.append(row[:ends[0] + 1] if ends else row)
        return out


def sample_next(logits, temperature, top_k, top_p, gen):
    """One token per row from (B, vocab) logits: greedy, or temperature + top-k + top-p
    (nucleus)."""
    if temperature == 0:
        return logits.argmax(-1)
    scaled = logits / temperature
    if (torch.isinf(scaled) & torch.isfinite(logits)).any():  # a temperature so small that
        return logits.argmax(-1)  # finite logits overflow: greedy, which is what it tends to
    logits = scaled
    if top_k:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits.sort(-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # keep the smallest set whose mass reaches top_p: drop a token once the likelier ones
        # before it already hold top_p; the likeliest token is always kept
        drop = probs.cumsum(-1) - probs >= top_p
        drop[:, 0] = False
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    probs = logits.softmax(-1)
    return torch.multinomial(probs, 1, generator=gen).squeeze(-1)


class ScalarHeadGPT(GPT):
    """The same trunk with a scalar head: one number per position instead of next-token logits.

    The reward model reads it at an answer's last token; PPO's critic reads it at every token of
    the answer. Initialised from a language model (`from_language_model`), it starts from what
    that model knows and learns only what the number should mean."""
    head = "scalar"

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        del self.lm_head  # no vocabulary projection: this model scores text, it never writes it
        self.score_head = nn.Linear(cfg.n_embd, 1, bias=False)
        # small enough that the first scores are near 0 (1/sqrt(n_embd + 1), as in the OpenAI
        # summarize-from-feedback code)
        nn.init.normal_(self.score_head.weight, std=1 / math.sqrt(cfg.n_embd + 1))

    @classmethod
    def from_language_model(cls, model: GPT):
        """The trunk of `model` (a base or SFT model) with a fresh scalar head."""
        scalar = cls(model.config).to(model.embed_tokens.weight.device)
        own = scalar.state_dict()  # a likelihood reward model's buffers (beta ...) are not kept
        trunk = {k: v for k, v in model.state_dict().items() if k in own}
        missing, _ = scalar.load_state_dict(trunk, strict=False)
        assert missing == ["score_head.weight"], missing
        return scalar

    @classmethod
    def from_reward_model(cls, reward_model: GPT):
        """PPO's critic before it learns: a copy of a scalar-head reward model, or a fresh scalar
        head on a likelihood reward model's trunk."""
        if isinstance(reward_model, ScalarHeadGPT):
            return copy.deepcopy(reward_model)
        return cls.from_language_model(reward_model)

    def forward(self, idx, *, pad=None):
        """Scores (B, T) in fp32: the value of each position, given the tokens up to it."""
        return self.score_head(self.hidden_states(idx, pad=pad)).squeeze(-1).float()

    def stream(self, *args, **kwargs):
        raise TypeError("a scalar-head model (reward model, critic) scores text; it cannot "
                        "generate")

    def token_logprobs(self, *args, **kwargs):
        raise TypeError("a scalar-head model (reward model, critic) has no next-token "
                        "distribution: it gives one score per position")


class LikelihoodRewardGPT(GPT):
    """A reward model that keeps the language model's head: an answer's score is beta times its
    log-likelihood, the sum of log p(token | all before it) over the answer's tokens (those after
    the latest <|assistant|> token, its <|end|> included).

    Why: whether "Paris" is right for France lives in the next-token distribution (the model
    would say it), while a fresh scalar head must learn to read it from one hidden state, and on
    this world's facts it hardly does. Trained with the same ranking loss, the model moves its
    likelihoods toward what the labeler prefers; it scores as ScalarHeadGPT does, so reward.py,
    PPO and the evaluations read it the same way: one number per position, read at the last."""
    head = "likelihood"

    def __init__(self, cfg: GPTConfig):
        super().__init__(cfg)
        # buffers, not parameters: saved in the checkpoint with the weights, never trained
        self.register_buffer("beta", torch.tensor(1.0))
        self.register_buffer("answer_start_id", torch.tensor(-1))

    @classmethod
    def from_language_model(cls, model: GPT, *, answer_start_id: int, beta: float):
        """`model` (an SFT model) whole, scoring the tokens after `answer_start_id`, times beta."""
        scorer = cls(model.config).to(model.embed_tokens.weight.device)
        missing, unexpected = scorer.load_state_dict(model.state_dict(), strict=False)
        assert sorted(missing) == ["answer_start_id", "beta"] and not unexpected, missing
        scorer.beta.fill_(beta)
        scorer.answer_start_id.fill_(answer_start_id)
        return scorer

    def forward(self, idx, *, pad=None):
        """Scores (B, T) in fp32: at position t, beta x the log-likelihood of the tokens after the
        latest answer start up to t (0 at the answer start and before it)."""
        token_logprobs = self.token_logprobs(idx, pad=pad)  # (B, T-1): token t+1's, given up to t
        running = F.pad(token_logprobs, (1, 0)).cumsum(1)  # (B, T): summed from the first token
        positions = torch.arange(idx.shape[1], device=idx.device).expand_as(idx)
        start = torch.where(idx == self.answer_start_id, positions, -1).cummax(1).values
        since_start = running - running.gather(1, start.clamp(min=0))
        return self.beta * torch.where(start >= 0, since_start, 0.0)

    def stream(self, *args, **kwargs):
        raise TypeError("a reward model scores text; sample from the SFT model it started from")
