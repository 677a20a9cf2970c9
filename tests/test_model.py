"""model.py: causality, KV cache == no cache, and parity with Hugging Face's Llama."""
import pytest
import torch

from export import export_hf
from model import GPT, GPTConfig


def tiny(**kw):
    torch.manual_seed(0)
    cfg = dict(vocab_size=97, block_size=64, n_layer=2, n_head=4, n_kv_head=2, n_embd=32)
    cfg.update(kw)
    return GPT(GPTConfig(**cfg)).eval()


def test_future_tokens_never_change_earlier_logits():
    model = tiny()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    a, _ = model(x)
    b, _ = model(y)
    torch.testing.assert_close(a[:, :12], b[:, :12])
    assert not torch.allclose(a[:, 12:], b[:, 12:])


def test_left_padded_row_equals_row_run_alone():
    model = tiny()
    short, long = [5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8]
    batch = torch.tensor([[0] * 5 + short, long])
    logits, _ = model(batch, pad=torch.tensor([5, 0]))
    alone, _ = model(torch.tensor([short]))
    torch.testing.assert_close(logits[0, 5:], alone[0])
    full, _ = model(torch.tensor([long]))
    torch.testing.assert_close(logits[1], full[0])


@pytest.mark.parametrize("n_kv_head", [4, 2])
def test_cached_generation_equals_uncached(n_kv_head):
    model = tiny(n_kv_head=n_kv_head)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11]]
    kw = dict(max_new_tokens=20, temperature=0)
    assert model.generate(prompts, use_cache=True, **kw) == \
        model.generate(prompts, use_cache=False, **kw)
    # and the logits agree at every step, not just the argmax
    from model import KVCache
    L = 7
    pad = torch.tensor([L - len(p) for p in prompts])
    seq = torch.tensor([[0] * (L - len(p)) + p for p in prompts])
    cache = KVCache(model.config, pad, L + 5)
    step_logits, _ = model(seq, cache=cache)
    for _ in range(5):
        nxt = step_logits[:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
        step_logits, _ = model(nxt, cache=cache)
        full, _ = model(seq, pad=pad)
        torch.testing.assert_close(step_logits[:, -1], full[:, -1], atol=1e-5, rtol=1e-4)


def test_sampling_is_seeded_and_stops_per_row():
    model = tiny()
    prompts = [[1, 2], [3, 4, 5]]
    a = model.generate(prompts, 30, temperature=1.0, top_k=20, top_p=0.9, seed=1)
    b = model.generate(prompts, 30, temperature=1.0, top_k=20, top_p=0.9, seed=1)
    assert a == b
    stop = a[0][3]  # a token row 0 emits: it must end row 0 there, and no row runs past its stop
    c = model.generate(prompts, 30, temperature=1.0, top_k=20, top_p=0.9, seed=1, stop_ids=[stop])
    assert c[0] == a[0][:a[0].index(stop) + 1]
    for row in c:
        assert stop not in row[:-1]


def test_top_k_one_is_greedy():
    model = tiny()
    prompts = [[1, 2, 3]]
    assert model.generate(prompts, 10, temperature=0.7, top_k=1, seed=3) == \
        model.generate(prompts, 10, temperature=0)


def test_a_temperature_so_small_the_logits_overflow_samples_greedily():
    model = tiny()
    prompts = [[1, 2, 3], [4]]
    assert model.generate(prompts, 10, temperature=1e-45, top_k=50, top_p=0.9, seed=3) == \
        model.generate(prompts, 10, temperature=0)


def test_logits_masked_to_minus_infinity_still_sample_at_an_ordinary_temperature():
    from model import sample_next  # token healing masks the tokens it rules out this way
    logits = torch.tensor([[0.0, 0.0, float("-inf")]]).repeat(200, 1)
    picks = sample_next(logits, 1.0, None, None, torch.Generator().manual_seed(0))
    assert set(picks.tolist()) == {0, 1}


def test_too_long_prompt_is_refused():
    model = tiny()
    with pytest.raises(ValueError, match="context length"):
        model.generate([[1] * 60], 10)


def test_parity_with_huggingface_llama(tmp_path):
    import transformers  # test-only dependency (requirements-dev.txt)
    model = tiny(n_layer=3)
    export_hf(model, tmp_path)
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, torch_dtype=torch.float32).eval()
    x = torch.randint(0, 97, (3, 40))
    ours, _ = model(x)
    with torch.no_grad():
        theirs = hf(x).logits
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)


def test_export_cli_writes_and_refuses_an_unusable_folder(tiny_base, tmp_path):
    import os
    import subprocess
    import sys
    from tests.conftest import ROOT
    (tmp_path / "file").write_text("not a folder")
    for out, message in ((tmp_path / "file", "is a file, not a folder"),
                         (tmp_path / "file" / "sub", "cannot write there")):
        run = subprocess.run([sys.executable, "export.py", tiny_base, str(out)], cwd=ROOT,
                             capture_output=True, text=True)
        assert run.returncode == 2 and run.stderr.count("\n") == 1
        assert run.stderr.startswith(f"error: OUT {out}: {message}")
    run = subprocess.run([sys.executable, "export.py", tiny_base, str(tmp_path / "hf")], cwd=ROOT,
                         capture_output=True, text=True)
    assert run.returncode == 0
    assert sorted(os.listdir(tmp_path / "hf")) == ["config.json", "model.safetensors"]


# ----------------------------------------------------------------------------- for RLHF
def left_padded(rows, pad_id=0):
    L = max(map(len, rows))
    return (torch.tensor([[pad_id] * (L - len(r)) + r for r in rows]),
            torch.tensor([L - len(r) for r in rows]))


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_logprobs_equal_the_logits_by_hand_in_a_left_padded_batch(temperature):
    model = tiny(n_kv_head=2)
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    ids, pad = left_padded(rows)
    batched = model.token_logprobs(ids, pad=pad, temperature=temperature)
    assert batched.shape == (3, 7)
    for b, row in enumerate(rows):
        logits, _ = model(torch.tensor([row]))  # the row alone, no padding
        by_hand = torch.log_softmax(logits[0, :-1] / temperature, -1)
        expected = by_hand[torch.arange(len(row) - 1), torch.tensor(row[1:])]
        torch.testing.assert_close(batched[b, pad[b]:], expected, atol=1e-5, rtol=1e-5)


def test_token_logprobs_refuse_temperature_zero():
    with pytest.raises(ValueError, match="temperature above 0"):
        tiny().token_logprobs(torch.tensor([[1, 2, 3]]), temperature=0)


def test_scalar_head_ignores_padding_and_batch_mates():
    from model import ScalarHeadGPT
    model = ScalarHeadGPT.from_language_model(tiny())
    rows = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9, 10, 11, 12, 13]]
    ids, pad = left_padded(rows, pad_id=42)
    scores = model(ids, pad=pad)
    assert scores.shape == (3, 8) and scores.dtype == torch.float32
    for b, row in enumerate(rows):
        alone = model(torch.tensor([row]))[0]
        torch.testing.assert_close(scores[b, pad[b]:], alone, atol=1e-5, rtol=1e-5)
        # right padding (a response shorter than its batch-mates) changes no earlier score
        right = model(torch.tensor([row + [42] * 4]))[0]
        torch.testing.assert_close(right[:len(row)], alone, atol=1e-5, rtol=1e-5)
    other = model(left_padded([rows[0], [3] * 8])[0], pad=torch.tensor([5, 0]))
    torch.testing.assert_close(other[0, 5:], scores[0, 5:], atol=1e-5, rtol=1e-5)


def test_scalar_head_starts_from_the_language_models_trunk():
    from model import ScalarHeadGPT
    lm = tiny()
    scalar = ScalarHeadGPT.from_language_model(lm)
    x = torch.randint(0, 97, (2, 10))
    torch.testing.assert_close(scalar.hidden_states(x), lm.hidden_states(x))
    assert not hasattr(scalar, "lm_head")
    with pytest.raises(TypeError, match="cannot generate"):
        scalar.generate([[1, 2]], 3)
    with pytest.raises(TypeError, match="no next-token distribution"):
        scalar.token_logprobs(x)


def test_checkpoints_record_their_head_and_load_as_the_right_model(tmp_path):
    from checkpoints import load_checkpoint, save_checkpoint
    from data.tokenizer import Tokenizer
    from model import ScalarHeadGPT
    tok = Tokenizer.train(["a small corpus for a small tokenizer " * 20], 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    model = ScalarHeadGPT.from_language_model(tiny(vocab_size=tok.n_vocab))
    save_checkpoint(str(tmp_path), "reward", model, tok)
    loaded, _, ckpt = load_checkpoint(str(tmp_path), ["reward"])
    assert ckpt["head"] == "scalar" and isinstance(loaded, ScalarHeadGPT)
    x = torch.randint(0, tok.n_vocab, (2, 9))
    torch.testing.assert_close(loaded(x), model(x))


def test_a_likelihood_reward_model_scores_beta_times_the_answers_log_likelihood(tmp_path):
    """The score at each position equals a naive loop over the tokens after the latest answer
    start (7 here; a conversation has two), 0 up to it; right padding and batch-mates change no
    score; the checkpoint keeps beta and the answer start; a critic takes its trunk."""
    from checkpoints import load_checkpoint, save_checkpoint
    from data.tokenizer import Tokenizer
    from model import LikelihoodRewardGPT, ScalarHeadGPT
    tok = Tokenizer.train(["a small corpus for a small tokenizer " * 20], 300)
    tok.save(str(tmp_path / "tokenizer.json"))
    lm = tiny(vocab_size=tok.n_vocab)
    scorer = LikelihoodRewardGPT.from_language_model(lm, answer_start_id=7, beta=0.5)
    rows = [[1, 7, 3, 4, 2, 7, 9, 10, 11, 12], [5, 6, 7, 8], [3, 4, 5]]
    ids = torch.tensor([row + [0] * (10 - len(row)) for row in rows])  # right-padded
    scores = scorer(ids)
    for b, row in enumerate(rows):
        naive = [0.0] * len(row)  # restarts at each answer start; 0 before the first
        for t in range(1, len(row)):
            if row[t] != 7 and 7 in row[:t]:
                logits, _ = lm(torch.tensor([row[:t]]))
                naive[t] = naive[t - 1] + 0.5 * logits[0, -1].log_softmax(-1)[row[t]].item()
        assert scores[b, :len(row)].tolist() == pytest.approx(naive, abs=1e-5)
        assert scorer(torch.tensor([row]))[0].tolist() == pytest.approx(naive, abs=1e-5)
    save_checkpoint(str(tmp_path), "reward", scorer, tok)
    loaded, _, ckpt = load_checkpoint(str(tmp_path), ["reward"])
    assert ckpt["head"] == "likelihood" and isinstance(loaded, LikelihoodRewardGPT)
    torch.testing.assert_close(loaded(ids), scores)
    critic = ScalarHeadGPT.from_reward_model(loaded)  # PPO's critic: a fresh head on its trunk
    torch.testing.assert_close(critic.hidden_states(ids), lm.hidden_states(ids))
    with pytest.raises(TypeError, match="scores text"):
        loaded.generate([[1, 2]], 3)


def test_top_p_keeps_the_smallest_set_whose_mass_reaches_p():
    from model import sample_next
    probs = torch.tensor([0.05, 0.5, 0.15, 0.3])  # by rank: token 1, 3, 2, 0
    logits = probs.log().expand(4000, 4)
    gen = torch.Generator().manual_seed(0)
    for top_p, kept in ((0.4, {1}), (0.7, {1, 3}), (0.85, {1, 3, 2}), (0.99, {0, 1, 2, 3}),
                        (1.0, {0, 1, 2, 3})):
        drawn = sample_next(logits, 1.0, None, top_p, gen)
        assert set(drawn.tolist()) == kept, top_p
    # at the boundary: 0.5 is reached by the likeliest token alone, 0.75 by the first two
    exact = torch.tensor([0.5, 0.25, 0.125, 0.125]).log().expand(4000, 4)  # exact in float32
    for top_p, kept in ((0.5, {0}), (0.75, {0, 1}), (0.7501, {0, 1, 2}), (1e-9, {0})):
        assert set(sample_next(exact, 1.0, None, top_p, gen).tolist()) == kept, top_p
    # within the kept set, the original odds are kept (renormalised): 0.5 : 0.3
    drawn = sample_next(logits, 1.0, None, 0.7, gen)
    assert abs((drawn == 1).float().mean().item() - 0.5 / 0.8) < 0.03
