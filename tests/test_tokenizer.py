"""Tests for data/tokenizer.py: correctness of the incremental BPE trainer against a
naive reference, tiktoken agreement, round trips, special tokens and the file format."""
import json
import os
import random
from collections import Counter

import pytest
import regex

from data.tokenizer import (SPECIAL_TOKENS, SPLIT_PATTERN, Tokenizer, bpe_merges,
                            count_chunks)

WORDS = ("the of and to in a is that for it as was with be by on not he I this are or his "
         "from at which but have an they you were her she there been one all we their has "
         "would when if so no will more time can out up about into them some could what "
         "king lord love sweet night thee thou hath doth wherefore tomorrow 1984 42 3.14 "
         "café naïve 日本語 東京 Привет мир 😀 🎉 e\u0301 don't it's we'll you're").split()


def random_words(seed: int, n_words: int) -> str:
    """Made-up words with English-like letter frequencies: many distinct chunks."""
    rng = random.Random(seed)
    letters, freq = "etaoinshrdlucmfwypvbgkjqxz", [13, 9, 8, 8, 7, 7, 6, 6, 6, 4, 4, 3, 3, 2, 2, 2,
                                                    2, 2, 1, 1, 1, 1, 1, 1, 1, 1]
    lexicon = ["".join(rng.choices(letters, freq, k=rng.randint(1, 9))) for _ in range(3000)]
    words = rng.choices(lexicon, [1 / (i + 1) for i in range(len(lexicon))], k=n_words)
    return " ".join(w.capitalize() if rng.random() < 0.1 else w for w in words)


def make_docs(seed: int, n_docs: int, words_per_doc: int) -> list[str]:
    """Zipf-ish pseudo-English with punctuation, numbers, unicode and odd whitespace."""
    rng = random.Random(seed)
    weights = [1 / (i + 1) for i in range(len(WORDS))]
    docs = []
    for _ in range(n_docs):
        out = []
        for w in rng.choices(WORDS, weights, k=words_per_doc):
            r = rng.random()
            if r < 0.1:
                w = w.capitalize()
            elif r < 0.15:
                w += rng.choice([",", ".", "!", "?!", ";", "...", "\n", "\n\n", "  ", "\t"])
            elif r < 0.17:
                w = rng.choice(["aaaa", "aaaaaaa", "====", "1234567", "!!!"])  # overlapping pairs
            out.append(w)
        docs.append(" ".join(out) + " " + random_words(seed + len(docs), words_per_doc // 4))
    return docs


DOCS = make_docs(seed=0, n_docs=100, words_per_doc=800)  # ~350 KB


@pytest.fixture(scope="module")
def tok():
    return Tokenizer.train(DOCS, vocab_size=600)


def reference_merges(counts: dict[bytes, int], n_merges: int) -> list[tuple[int, int]]:
    """Slow, obviously-correct BPE: recount every pair from scratch for each merge."""
    vocab = [bytes([i]) for i in range(256)]
    words = {w: list(w) for w in counts}
    merges = []
    for _ in range(n_merges):
        pairs = Counter()
        for w, ids in words.items():
            for p in zip(ids, ids[1:]):
                pairs[p] += counts[w]
        pairs = {p: n for p, n in pairs.items() if vocab[p[0]] + vocab[p[1]] not in vocab}
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], vocab[p[0]], vocab[p[1]]))
        new = len(vocab)
        vocab.append(vocab[best[0]] + vocab[best[1]])
        merges.append(best)
        for w, ids in words.items():
            out, j = [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == best:
                    out.append(new)
                    j += 2
                else:
                    out.append(ids[j])
                    j += 1
            words[w] = out
    return merges


def naive_encode(text: str, merges: list[tuple[int, int]]) -> list[int]:
    """Split with the regex, then in each chunk apply the lowest-ranked merge until none apply."""
    rank = {p: 256 + i for i, p in enumerate(merges)}
    result = []
    for chunk in regex.findall(SPLIT_PATTERN, text):
        ids = list(chunk.encode("utf-8"))
        while len(ids) > 1:
            best = min(zip(ids, ids[1:]), key=lambda p: rank.get(p, float("inf")))
            if best not in rank:
                break
            out, j = [], 0
            while j < len(ids):
                if j + 1 < len(ids) and (ids[j], ids[j + 1]) == best:
                    out.append(rank[best])
                    j += 2
                else:
                    out.append(ids[j])
                    j += 1
            ids = out
        result.extend(ids)
    return result


def random_unicode(rng: random.Random, n: int) -> str:
    chars = []
    for _ in range(n):
        cp = rng.choice([rng.randrange(0x20, 0x7F), rng.randrange(0, 0x20),
                         rng.randrange(0x80, 0x800), rng.randrange(0x800, 0xD800),
                         rng.randrange(0xE000, 0x110000)])
        chars.append(chr(cp))
    return "".join(chars)


@pytest.mark.parametrize("counts, n_merges", [
    (count_chunks(make_docs(seed=1, n_docs=5, words_per_doc=400)), 150),
    (count_chunks([random_words(seed=2, n_words=12000)]), 200),
    (count_chunks(["aaaaaaaaa aaaa aaa ab ab abab bababa aaab baaa " * 3, "zzz zz z"]), 40),
    ({b"abcabc": 1, b"bcabca": 1, b"cabcab": 1, b"xyxyx": 2}, 20),  # ties everywhere
])
def test_incremental_trainer_matches_reference(counts, n_merges):
    assert bpe_merges(counts, n_merges) == reference_merges(counts, n_merges)


def test_incremental_trainer_matches_reference_fuzz():
    rng = random.Random(3)  # tiny alphabets: lots of overlapping pairs ("aaa") and ties
    for _ in range(300):
        counts = {"".join(rng.choices("abc", k=rng.randint(1, 10))).encode(): rng.randint(1, 4)
                  for _ in range(rng.randint(1, 8))}
        assert bpe_merges(counts, 25) == reference_merges(counts, 25)


def test_training_is_deterministic(tok):
    again = Tokenizer.train(iter(DOCS), vocab_size=600)  # a generator works as well as a list
    assert again.tokens == tok.tokens
    assert again.dumps() == tok.dumps() and again.checksum == tok.checksum
    assert Tokenizer.train(DOCS[:50], vocab_size=600).checksum != tok.checksum


def test_vocab_structure(tok):
    assert tok.n_vocab == 600 == len(tok.tokens) + len(SPECIAL_TOKENS)
    assert len(set(tok.tokens)) == len(tok.tokens)  # no duplicate byte strings
    assert tok.tokens[:256] == [bytes([i]) for i in range(256)]
    n = len(tok.tokens)
    for i in range(n):  # ids 0..n-1 are exactly the ranks, in order
        assert tok.enc.decode_single_token_bytes(i) == tok.tokens[i]
    for i, name in enumerate(SPECIAL_TOKENS):  # specials take the last ids
        assert tok.special(name) == n + i
        assert tok.decode([n + i]) == name
    assert tok.eot_id == tok.special("<|endoftext|>") == n
    assert tok.pad_id == tok.special("<|pad|>") == tok.n_vocab - 1
    assert tok.pad_id != tok.special("<|end|>")
    with pytest.raises(KeyError):
        tok.special("<|nope|>")


def test_round_trip_unicode(tok):
    cases = ["", " ", "hello world", "   leading and trailing   ", "\n\n\t\r\n  \x00\x01\x7f",
             "emoji 😀👍🏽👨‍👩‍👧 flags 🇫🇷", "中文字符 日本語 한국어", "e\u0301 a\u0308\u0323 Z\u0351\u0352\u0353",
             "مرحبا بالعالم", "x" * 1000, " " * 257, "don't WE'LL it'S", "3.14159 1234567890",
             "\ufeffBOM \u200b zero width \U0010ffff", DOCS[0][:2000]]
    rng = random.Random(1234)
    cases += [random_unicode(rng, rng.randrange(1, 60)) for _ in range(300)]
    for s in cases:
        ids = tok.encode(s)
        assert tok.decode(ids) == s
        assert tok.decode_bytes(ids) == s.encode("utf-8")
    assert tok.encode_batch(cases) == [tok.encode(s) for s in cases]


def test_arbitrary_bytes(tok):
    rng = random.Random(5)
    for _ in range(100):
        raw = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 40)))
        assert tok.decode_bytes(list(raw)) == raw  # single-byte ids are the bytes themselves
        assert tok.decode(list(raw)) == raw.decode("utf-8", errors="replace")  # never raises
    # Splitting a multi-byte character across a decode boundary gives U+FFFD, not an error.
    ids = tok.encode("😀")
    assert tok.decode_bytes(ids) == "😀".encode()
    assert "\ufffd" in tok.decode(list("😀".encode())[:2])


def test_special_strings_are_plain_text(tok):
    specials = {tok.special(name) for name in SPECIAL_TOKENS}
    for s in ["hi <|assistant|> there <|end|>", "".join(SPECIAL_TOKENS), "<|endoftext|><|pad|>x"]:
        ids = tok.encode(s)
        assert not specials & set(ids)
        assert tok.decode(ids) == s
        assert not any(specials & set(b) for b in tok.encode_batch([s, s]))


def test_tiktoken_matches_naive_merges(tok):
    merges = bpe_merges(count_chunks(DOCS), 600 - 256 - len(SPECIAL_TOKENS))
    vocab = [bytes([i]) for i in range(256)]
    for a, b in merges:
        vocab.append(vocab[a] + vocab[b])
    assert vocab == tok.tokens
    rng = random.Random(7)
    texts = [DOCS[3], "The king's tomorrow, and tomorrow!!! aaaaaaaaaa 12345678",
             "hello world, thou art café 😀", random_unicode(rng, 200)]
    for t in texts:
        assert tok.encode(t) == naive_encode(t, merges)


def test_save_load(tok, tmp_path):
    path = tmp_path / "tok.json"
    tok.save(path)
    assert os.listdir(tmp_path) == ["tok.json"]  # the temp file was renamed away
    assert path.read_text(encoding="utf-8") == tok.dumps()
    loaded = Tokenizer.load(path)
    assert loaded.checksum == tok.checksum and loaded.n_vocab == tok.n_vocab
    assert loaded.encode_batch(DOCS[:5]) == tok.encode_batch(DOCS[:5])
    assert loaded.special("<|end|>") == tok.special("<|end|>")
    json.loads(path.read_text())  # plain JSON, readable by anything


@pytest.mark.parametrize("content", [
    "", "{", "[]", '{"format": "byte-bpe/1"}', '{"format": "other"}',
    '{"format": "byte-bpe/1", "pattern": "x", "special_tokens": [], "tokens": ["zz"]}',
    '{"format": "byte-bpe/1", "pattern": "x", "special_tokens": [], "tokens": ["00", "00"]}',
])
def test_load_malformed_names_file(tmp_path, content):
    path = tmp_path / "bad_tok.json"
    path.write_text(content)
    with pytest.raises(ValueError, match="bad_tok.json"):
        Tokenizer.load(path)


def test_load_truncated_and_missing(tok, tmp_path):
    path = tmp_path / "trunc.json"
    path.write_text(tok.dumps()[:5000])
    with pytest.raises(ValueError, match="trunc.json"):
        Tokenizer.load(path)
    with pytest.raises(FileNotFoundError, match="missing.json"):
        Tokenizer.load(tmp_path / "missing.json")


def test_train_rejects_tiny_vocab():
    with pytest.raises(ValueError):
        Tokenizer.train(["abc"], vocab_size=100)
