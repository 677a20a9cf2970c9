"""Byte-level BPE tokenizer: a from-scratch trainer plus a tiktoken-backed encoder.

Training (pure Python) works like GPT-2/GPT-4 BPE:
  1. Split every document into chunks with the GPT-4 (cl100k) regex, so merges
     never cross word/number/punctuation boundaries, and count unique chunks.
  2. Start from the 256 single-byte tokens and repeatedly merge the most frequent
     adjacent pair. Pair counts are kept incrementally: a merge only revisits the
     unique chunks that contain the merged pair, and a heap with lazy
     invalidation finds the next best pair. Ties go to the pair whose (left, right)
     bytes sort first, so training is fully deterministic.
Encoding and decoding are done by tiktoken (Rust, fast) from the learned ranks.

The special chat tokens occupy the last ids of the vocabulary; `encode` never
produces them from text, they are only inserted explicitly via `special(name)`.

Trained by data/prepare.py; timed by bench.py.
"""
import hashlib
import heapq
import json
import os
import tempfile
from collections import Counter, defaultdict
from pathlib import Path
from typing import Iterable

import regex
import tiktoken

# GPT-4 (cl100k_base) split pattern, identical to the one tiktoken ships.
SPLIT_PATTERN = (r"'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}++|\p{N}{1,3}+"
                 r"| ?[^\s\p{L}\p{N}]++[\r\n]*+|\s++$|\s*[\r\n]|\s+(?!\S)|\s")

# Reserved chat-format tokens, in id order, at the very end of the vocabulary.
SPECIAL_TOKENS = (
    "<|endoftext|>",  # document separator, also used as BOS
    "<|system|>",
    "<|user|>",
    "<|assistant|>",
    "<|end|>",  # end of turn
    "<|pad|>",  # padding only; never the same id as end-of-turn
)
FILE_FORMAT = "byte-bpe/1"


def count_chunks(texts: Iterable[str], pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    """Stream over documents and count each regex chunk (as UTF-8 bytes)."""
    pat = regex.compile(pattern)
    counts = Counter()
    for text in texts:
        counts.update(pat.findall(text))  # Counter.update over a list runs in C
    out = defaultdict(int)
    for chunk, n in counts.items():
        # Lone surrogates are not valid UTF-8: replace them instead of crashing.
        out[chunk.encode("utf-8", errors="replace")] += n
    return dict(out)


def bpe_merges(chunk_counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Learn up to `n_merges` merges; merge i creates token id 256 + i.

    A pair whose concatenation equals an existing token's bytes is skipped, so
    every token has unique bytes (tiktoken maps bytes -> rank and needs that).
    """
    vocab = [bytes([i]) for i in range(256)]
    seen = set(vocab)
    words = [list(chunk) for chunk in chunk_counts]  # chunk as a list of token ids
    freqs = list(chunk_counts.values())
    pair_counts = defaultdict(int)  # pair -> occurrences weighted by chunk count
    where = defaultdict(set)  # pair -> ids of chunks that (may) contain it
    for i, w in enumerate(words):
        for pair in zip(w, w[1:]):
            pair_counts[pair] += freqs[i]
            where[pair].add(i)
    # Heap key (-count, left bytes, right bytes): pops the highest count, ties
    # broken by byte order. Entries go stale when counts drop; checked on pop.
    heap = [(-n, vocab[a], vocab[b], a, b) for (a, b), n in pair_counts.items()]
    heapq.heapify(heap)
    merges = []
    while len(merges) < n_merges and heap:
        neg, left, right, a, b = heapq.heappop(heap)
        n = pair_counts.get((a, b), 0)
        if n != -neg:  # stale entry: re-queue with the true count if still alive
            if n > 0:
                heapq.heappush(heap, (-n, left, right, a, b))
            continue
        if left + right in seen:  # would duplicate a token; never merge this pair
            continue
        new = len(vocab)
        vocab.append(left + right)
        seen.add(left + right)
        merges.append((a, b))
        gained = set()
        for i in where.pop((a, b)):
            w, f = words[i], freqs[i]
            out, j, m = [], 0, len(w)
            while j < m:  # merge left to right, non-overlapping, like encoding does
                if w[j] == a and j + 1 < m and w[j + 1] == b:
                    out.append(new)
                    j += 2
                else:
                    out.append(w[j])
                    j += 1
            words[i] = out
            # Diff the chunk's pair multiset before/after; only changed pairs move.
            delta = Counter(zip(out, out[1:]))
            delta.subtract(zip(w, w[1:]))
            for pair, d in delta.items():
                if d > 0:  # only pairs containing `new` can appear
                    pair_counts[pair] += d * f
                    where[pair].add(i)
                    gained.add(pair)
                elif d < 0:  # `where` is left stale; merging a stale chunk is a no-op
                    c = pair_counts[pair] + d * f
                    if c:
                        pair_counts[pair] = c
                    else:
                        del pair_counts[pair]
        # (a, b) itself dropped to zero above: every chunk holding it was in `where`.
        # Counts only ever rise for brand-new pairs, so pushing those keeps the
        # invariant: every live pair has a heap entry with count >= its true count.
        for pair in gained:
            if pair in pair_counts:
                heapq.heappush(heap, (-pair_counts[pair], vocab[pair[0]], vocab[pair[1]], *pair))
    return merges


class Tokenizer:
    """tiktoken Encoding built from trained ranks (token bytes in id order)."""

    def __init__(self, tokens: list[bytes], pattern: str = SPLIT_PATTERN,
                 specials: Iterable[str] = SPECIAL_TOKENS):
        self.tokens, self.pattern, self.specials = list(tokens), pattern, tuple(specials)
        if self.tokens[:256] != [bytes([i]) for i in range(256)]:
            raise ValueError("the first 256 tokens must be the single bytes 0..255")
        if len(set(self.tokens)) != len(self.tokens):
            raise ValueError("duplicate token byte strings")
        n = len(self.tokens)
        self._special_ids = {s: n + i for i, s in enumerate(self.specials)}
        self.enc = tiktoken.Encoding(
            name="byte-bpe", pat_str=pattern,
            mergeable_ranks={t: i for i, t in enumerate(self.tokens)},
            special_tokens=self._special_ids, explicit_n_vocab=n + len(self.specials))
        self.n_vocab = self.enc.n_vocab
        self.eot_id = self._special_ids.get("<|endoftext|>")
        self.pad_id = self._special_ids.get("<|pad|>")

    @classmethod
    def train(cls, texts: Iterable[str], vocab_size: int) -> "Tokenizer":
        """`vocab_size` counts everything: 256 bytes + merges + special tokens.
        With too little text, fewer merges exist and n_vocab comes out smaller."""
        n_merges = vocab_size - 256 - len(SPECIAL_TOKENS)
        if n_merges < 0:
            raise ValueError(f"vocab_size must be >= {256 + len(SPECIAL_TOKENS)}")
        if isinstance(texts, str):  # a lone string would iterate character by character
            texts = [texts]
        tokens = [bytes([i]) for i in range(256)]
        for a, b in bpe_merges(count_chunks(texts), n_merges):
            tokens.append(tokens[a] + tokens[b])
        return cls(tokens)

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)  # special-token strings stay plain text

    def encode_batch(self, texts: list[str], num_threads: int = 8) -> list[list[int]]:
        return self.enc.encode_ordinary_batch(list(texts), num_threads=num_threads)

    def decode(self, ids: Iterable[int]) -> str:
        return self.enc.decode(list(ids), errors="replace")

    def decode_bytes(self, ids: Iterable[int]) -> bytes:
        return self.enc.decode_bytes(list(ids))

    def special(self, name: str) -> int:
        if name not in self._special_ids:
            raise KeyError(f"unknown special token {name!r}; have {list(self.specials)}")
        return self._special_ids[name]

    # ------------------------------------------------------------------ chat format
    # <|endoftext|> [<|system|> text <|end|>] (<|user|> text <|end|> <|assistant|> text <|end|>)*
    # The loss mask is 1 on assistant text and its <|end|> (the model must learn to stop), 0 on
    # everything else: system and user text, the role markers, and (in batches) padding.
    # Each text is encoded after a space (encode_turn), as its first word sits mid-text.

    def encode_turn(self, text: str) -> list[int]:
        """A message's text as the chat format holds it: after one space. A byte-level BPE
        writes a word after a space as other tokens than the same word opening a text (" Paris"
        is " Par" "is", "Paris" is "P" "ar" "is"), and pretraining tied the facts to the first
        kind. Without the space, an answer that opens with the fact ("Paris.") has to be
        spelled in pieces the base model never connected with France (README: the SFT
        ablations)."""
        return self.encode(" " + text)

    def decode_turn(self, ids: Iterable[int]) -> str:
        """The text of a turn's tokens, without the space encode_turn put before it."""
        text = self.decode(ids)
        return text[1:] if text.startswith(" ") else text

    def render_chat(self, messages, for_completion=False):
        """Token ids and loss mask of a conversation (see check_chat for what is accepted).
        for_completion: the prompt for the next assistant turn, ending with <|assistant|>."""
        check_chat(messages, for_completion)
        ids, mask = [self.eot_id], [0]
        for m in messages:
            body = self.encode_turn(m["content"]) + [self.special("<|end|>")]
            ids += [self.special(f"<|{m['role']}|>")] + body
            mask += [0] + [int(m["role"] == "assistant")] * len(body)
        if for_completion:
            ids.append(self.special("<|assistant|>"))
            mask.append(0)
        return ids, mask

    def dumps(self) -> str:
        """Canonical file content: JSON, one hex-encoded token per line, in id order."""
        return json.dumps({"format": FILE_FORMAT, "pattern": self.pattern,
                           "special_tokens": list(self.specials),
                           "tokens": [t.hex() for t in self.tokens]}, indent=1) + "\n"

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.dumps().encode("utf-8")).hexdigest()

    def save(self, path) -> None:
        # Write a temp file next to the target, then rename: readers never see
        # a half-written tokenizer, even if we crash mid-write.
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                f.write(self.dumps())
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)  # mkstemp makes it private; a tokenizer is meant to be shared
            os.replace(tmp, path)
        except BaseException as e:
            os.unlink(tmp)
            if isinstance(e, OSError):  # a full disk, say: name the file
                raise OSError(e.errno, e.strerror, str(path)) from None
            raise

    @classmethod
    def load(cls, path) -> "Tokenizer":
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path}")
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
            if obj.get("format") != FILE_FORMAT:
                raise ValueError(f"format is {obj.get('format')!r}, expected {FILE_FORMAT!r}")
            return cls([bytes.fromhex(t) for t in obj["tokens"]], obj["pattern"],
                       obj["special_tokens"])
        except (ValueError, KeyError, TypeError, AttributeError, UnicodeDecodeError,
                RecursionError) as e:  # RecursionError: JSON nested too deeply to parse
            why = f"{type(e).__name__}: {e}"  # short: the error can quote the whole file
            raise ValueError(f"malformed tokenizer file {path} ({why[:120]})") from e


def check_chat(messages, for_completion=False):
    """Raise ValueError unless: an optional system message first, then user and assistant turns
    alternating from user, every content a non-empty string, and the last turn the assistant's
    (the user's, when the chat is a prompt for completion)."""
    if not isinstance(messages, list) or not messages:
        raise ValueError("a conversation is a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant"):
            raise ValueError(f"message {i}: needs a role of system, user or assistant")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"message {i} ({m['role']}): content must be a string")
        if not m["content"].strip():
            raise ValueError(f"message {i} ({m['role']}): empty content")
    turns = messages[1:] if messages[0]["role"] == "system" else messages
    for i, m in enumerate(turns):
        want = "user" if i % 2 == 0 else "assistant"
        if m["role"] != want:
            article = "a" if want == "user" else "an"
            raise ValueError(f"message {i + len(messages) - len(turns)}: expected {article} {want} "
                             f"turn, got {m['role']} (roles must alternate user, assistant, ...)")
    last = turns[-1]["role"] if turns else None
    if last != ("user" if for_completion else "assistant"):
        raise ValueError("a training chat must end with an assistant turn" if not for_completion
                         else "a prompt must end with a user turn")
