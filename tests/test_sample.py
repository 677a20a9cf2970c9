"""sample.py on a real (tiny) checkpoint: streaming output, seeds, clear errors on bad input."""
import argparse
import os
import shutil

import pytest

import sample


@pytest.fixture(scope="session")
def ckpt(tiny_base):
    return tiny_base


def run(capsys, *args):
    sample.main(list(args))
    return capsys.readouterr()


def test_prompt_is_continued_and_seed_repeats(ckpt, capsys):
    args = ("--ckpt", ckpt, "--prompt", "What is the capital of France?\n", "--max-new-tokens",
            "20", "--seed", "7", "--device", "cpu")
    a, b = run(capsys, *args).out, run(capsys, *args).out
    assert a == b and a.startswith("What is the capital of France?")
    assert len(a) > len("What is the capital of France?") + 5


def test_num_samples_and_prompt_file(ckpt, capsys, tmp_path):
    (tmp_path / "p.txt").write_text("Q: What is the symbol for gold?\nA:")
    out = run(capsys, "--ckpt", ckpt, "--prompt-file", str(tmp_path / "p.txt"), "--num-samples",
              "3", "--max-new-tokens", "5", "--seed", "1", "--device", "cpu").out
    assert out.count("--- sample") == 3 and out.count("Q: What is the symbol for gold?") == 3


def test_interactive_reads_prompts_until_end_of_input(ckpt, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("The capital of Peru is\n\nQ: What is\n"))
    out = run(capsys, "--ckpt", ckpt, "--interactive", "--max-new-tokens", "4", "--seed", "0",
              "--device", "cpu").out
    assert "The capital of Peru is" in out and "Q: What is" in out


def test_missing_checkpoint(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path / "nope"), "--prompt", "hi"])
    assert e.value.code == 2
    assert f"--ckpt {tmp_path / 'nope'}: no checkpoint there" in capsys.readouterr().err


def test_checkpoint_without_tokenizer(ckpt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    os.remove(broken / "tokenizer.json")
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(broken), "--prompt", "hi"])
    assert "has no tokenizer.json" in capsys.readouterr().err


def test_prompt_longer_than_context(ckpt, capsys):
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--prompt", "word " * 500, "--device", "cpu"])
    err = capsys.readouterr().err
    assert "is 128 (shorten the prompt)" in err and err.count("\n") == 1


def test_truncated_checkpoint_file(ckpt, tmp_path, capsys):
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    data = (broken / "ckpt.pt").read_bytes()
    (broken / "ckpt.pt").write_bytes(data[: len(data) // 2])
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(broken), "--prompt", "hi"])
    assert "is not a checkpoint of this project (a damaged PyTorch file, cut short perhaps)" in \
        capsys.readouterr().err


def test_malformed_tokenizer_and_foreign_checkpoint(ckpt, tmp_path, capsys):
    import torch
    broken = tmp_path / "broken"
    shutil.copytree(ckpt, broken)
    (broken / "tokenizer.json").write_text("{not json")
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(broken), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert "malformed tokenizer file" in err and "Traceback" not in err
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    torch.save({"weight": torch.zeros(2)}, foreign / "ckpt.pt")  # a plain state_dict
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", str(foreign), "--prompt", "hi"])
    assert "not a checkpoint of this project" in capsys.readouterr().err


@pytest.mark.parametrize("content", ["pickle", "git lfs pointer"])
def test_a_foreign_file_is_refused_without_advice_to_load_it_unsafely(tmp_path, capsys, content):
    import collections
    import torch
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    if content == "pickle":  # a file torch would load only with weights_only=False
        torch.save({"model": collections.OrderedDict(a=torch.zeros(1)), "x": ValueError("boo")},
                   foreign / "ckpt.pt")
    else:  # what a clone without Git LFS holds
        (foreign / "ckpt.pt").write_text("version https://git-lfs.github.com/spec/v1\n"
                                         "oid sha256:" + "0" * 64 + "\nsize 63786819\n")
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(foreign), "--prompt", "hi"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"{foreign / 'ckpt.pt'} is not a checkpoint of this project" in err
    assert ("Python objects" if content == "pickle" else "Git LFS pointer") in err
    assert "weights_only" not in err and "False" not in err


@pytest.mark.parametrize("args,message", [
    (["--device", "cuda:99"], "--device cuda:99: "),
    (["--device", "gpu"], "--device gpu: not a device"),
    (["--temperature", "nan"], "--temperature must be >= 0"),
    (["--temperature", "inf"], "--temperature must be >= 0"),
])
def test_bad_settings_get_one_line(ckpt, capsys, args, message):
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", ckpt, "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: " + message) and err.count("\n") == 1


def test_a_reader_that_leaves_early_is_no_error(ckpt):
    import subprocess
    import sys
    from tests.conftest import ROOT
    run = subprocess.run(f"{sys.executable} sample.py --ckpt {ckpt} --prompt hi --num-samples 200 "
                         "--max-new-tokens 20 --seed 0 | head -c 10", shell=True, cwd=ROOT,
                         capture_output=True, text=True)
    assert len(run.stdout) == 10 and "Traceback" not in run.stderr


def test_a_reward_model_checkpoint_is_refused_with_a_reason(ckpt, tmp_path, capsys):
    from checkpoints import TOKENIZER_FILE, load_checkpoint, save_checkpoint
    from model import ScalarHeadGPT
    model, tok, _ = load_checkpoint(ckpt)
    save_checkpoint(str(tmp_path), "reward", ScalarHeadGPT.from_language_model(model), tok)
    shutil.copy(os.path.join(ckpt, TOKENIZER_FILE), tmp_path / TOKENIZER_FILE)
    with pytest.raises(SystemExit) as e:
        sample.main(["--ckpt", str(tmp_path), "--prompt", "hi", "--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1
    assert f"{tmp_path} is a 'reward' checkpoint: it scores answers" in err


def test_a_full_context_is_mentioned_only_when_it_cuts_an_answer(ckpt, capsys):
    # a prompt that leaves about 3 tokens: the continuation is cut there, and that is said once
    from checkpoints import load_checkpoint
    _, tok, _ = load_checkpoint(ckpt)
    words = "The capital of Peru is Lima and the capital of France is Paris. "
    text = words * 40 + "The capital of Spain is the city of"  # mid-sentence: it goes on
    while len(tok.encode(text)) + 1 > 128 - 3:
        text = text[1:]
    err = run(capsys, "--ckpt", ckpt, "--prompt", text, "--max-new-tokens", "50",
              "--temperature", "0", "--device", "cpu").err
    room = 128 - 1 - len(tok.encode(text))
    assert err.count(f"[cut: the context is full; {room} tokens were left for this answer]") == 1
    err = run(capsys, "--ckpt", ckpt, "--prompt", "The capital of Peru is", "--max-new-tokens",
              "5", "--device", "cpu", "--seed", "0").err
    assert "context is full" not in err  # room enough: no note


def test_interactive_gives_a_base_model_the_newline_that_was_typed(ckpt, monkeypatch):
    import io
    seen = []
    monkeypatch.setattr(sample.Sampler, "run", lambda self, text, out=None: seen.append(text))
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of France?\n"))
    sample.main(["--ckpt", ckpt, "--interactive", "--device", "cpu"])
    assert seen == ["What is the capital of France?\n"]  # not the end of a document


def test_piped_chat_shows_each_message_before_its_answer(tiny_sft, capsys, monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.StringIO("What is the capital of Japan?\n"))
    out = run(capsys, "--ckpt", tiny_sft, "--interactive", "--max-new-tokens", "4",
              "--temperature", "0", "--device", "cpu").out
    assert out.startswith("you> What is the capital of Japan?\n") and out.endswith("you> \n")


def test_format_puts_each_checkpoint_in_the_form_asked(ckpt, tiny_sft, capsys):
    args = ["--compare", ckpt, tiny_sft, "--prompt", "What is the capital of Peru?",
            "--max-new-tokens", "4", "--temperature", "0", "--device", "cpu"]
    chat = run(capsys, *args, "--format", "chat").out
    assert f"=== {ckpt} (base model, prompted as chat) ===" in chat
    assert "What is the capital of Peru?" not in chat  # a chat answer does not echo the request
    text = run(capsys, *args, "--format", "text").out
    assert f"=== {tiny_sft} (sft model, prompted as plain text) ===" in text
    assert text.count("What is the capital of Peru?") == 2  # each continues the text it was given


def test_next_tokens_are_the_models_softmax_and_greedy_takes_the_first(ckpt, capsys):
    import json
    import torch
    from checkpoints import load_checkpoint
    model, tok, _ = load_checkpoint(ckpt)
    ids = [tok.eot_id] + tok.encode("What is the capital of France?\n")
    top = model.eval().top_next_tokens(ids, 5)
    probs = model(torch.tensor([ids]))[0][0, -1].softmax(-1).topk(5)
    assert [t for t, _ in top] == probs.indices.tolist()
    assert [p for _, p in top] == pytest.approx(probs.values.tolist(), abs=1e-6)
    assert sum(p for _, p in top) <= 1 + 1e-6
    out = run(capsys, "--ckpt", ckpt, "--prompt", "What is the capital of France?\n",
              "--temperature", "0", "--max-new-tokens", "3", "--next-tokens", "4",
              "--next-tokens-steps", "2", "--device", "cpu").out
    lines = [line for line in out.splitlines() if line.startswith("[next token ")]
    assert [line[:14] for line in lines] == ["[next token 1:", "[next token 2:"]
    for line in lines:  # greedy decoding generates the likeliest token
        likeliest, _ = json.JSONDecoder().raw_decode(line.split(": ", 1)[1])
        assert json.loads(line.rsplit("; generated ", 1)[1][:-1]) == likeliest


def test_the_loss_mask_view_marks_exactly_the_trained_tokens(tiny_sft, capsys, tmp_path):
    import json
    from checkpoints import load_checkpoint
    _, tok, _ = load_checkpoint(tiny_sft)
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": "Capital of Peru?"},
                {"role": "assistant", "content": "Lima."}]
    tokens = sample.masked_tokens(tok, messages)
    ids, mask = tok.render_chat(messages)
    assert [trained for _, trained in tokens] == [bool(m) for m in mask]
    assert "".join(text for text, _ in tokens) == tok.decode(ids)
    (tmp_path / "chat.json").write_text(json.dumps({"messages": messages}))
    out = run(capsys, "--ckpt", tiny_sft, "--loss-mask", str(tmp_path / "chat.json")).out
    assert "Capital of Peru?<|end|><|assistant|>[ Lima.<|end|>]" in out  # (not a terminal)
    assert out.count("[") == 1 and f"{sum(mask)} of {len(mask)} tokens trained" in out
    (tmp_path / "chat.json").write_text(json.dumps({"messages": messages[:2]}))
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", tiny_sft, "--loss-mask", str(tmp_path / "chat.json")])
    assert "ending with an assistant turn" in capsys.readouterr().err


def test_heal_lets_the_model_rewrite_the_prompts_last_token(ckpt, capsys):
    """--heal: the prompt without its last token "?", then the likeliest token (greedy) among
    those that begin with "?" (here one the prompt did not have, so the test sees the healing),
    then the greedy continuation; the output shows the prompt once, then the rest."""
    import torch
    from checkpoints import load_checkpoint
    model, tok, _ = load_checkpoint(ckpt)
    prompt = "What is the capital of France?"
    ids = [tok.eot_id] + tok.encode(prompt)
    assert sample.heal(tok, ids) == (ids[:-1], b"?")
    allowed = sample.continuing(tok, b"?")
    logits = model.eval()(torch.tensor([ids[:-1]]))[0][0, -1]
    best = max(allowed, key=lambda i: logits[i].item())
    assert best != ids[-1] and tok.tokens[best].startswith(b"?")
    rest = model.generate([ids[:-1] + [best]], 5, temperature=0, stop_ids=[tok.eot_id])[0]
    out = run(capsys, "--ckpt", ckpt, "--prompt", prompt, "--heal", "--temperature", "0",
              "--max-new-tokens", "6", "--device", "cpu").out
    assert out == tok.decode(ids[1:-1] + [best] + [t for t in rest if t != tok.eot_id]) + "\n"


def test_healed_start_writes_the_tail_whatever_the_model_prefers(ckpt):
    """The first tokens write the taken-back bytes even when the model's likeliest token cannot
    (greedy and sampled): each is a part of what is left, or begins with all of it."""
    import torch
    from checkpoints import load_checkpoint
    model, tok, _ = load_checkpoint(ckpt)
    ids = [tok.eot_id] + tok.encode("What is the capital of")
    likeliest = model.eval()(torch.tensor([ids]))[0][0, -1].argmax().item()
    tail = b" Zq"  # a space, then letters the corpus never has there
    assert likeliest not in sample.continuing(tok, tail)
    for temperature, seed in ((0.0, None), (1.0, 3)):
        settings = argparse.Namespace(temperature=temperature, top_k=None, top_p=None)
        head = sample.healed_start(model, tok, ids, tail, settings, seed, "cpu")
        written = b"".join(tok.tokens[t] for t in head)
        assert written.startswith(tail) and len(written) - len(tok.tokens[head[-1]]) < len(tail)


def test_heal_takes_back_what_begins_a_longer_token_and_keeps_the_prompts_split():
    """The tokens ")" and ":" together begin the token "):\n": both are taken back; while they
    are written again, ")" (the prompt's own split) and "):\n" (the merge) may come, ":" not."""
    from data.tokenizer import Tokenizer
    tok = Tokenizer([bytes([i]) for i in range(256)] + [b":\n", b"):\n"])
    ids = [tok.eot_id] + [ord(c) for c in "f(x):"]
    assert sample.heal(tok, ids) == (ids[:-2], b"):")
    assert sample.continuing(tok, b"):") == [ord(")"), 257]
    assert sample.continuing(tok, b":") == [ord(":"), 256]
    assert sample.heal(tok, ids[:-1]) == (ids[:-2], b")")  # ")" alone begins "):\n"
    assert sample.heal(tok, ids[:-2]) == (ids[:-2], b"")  # no longer token begins with "x"
    assert sample.heal(tok, [tok.eot_id]) == ([tok.eot_id], b"")


def test_heal_scores_only_what_follows_the_prompt(ckpt, tiny_reward, capsys):
    """--score-with after --heal: the reward model reads the continuation without the prompt's
    end that the first token wrote again."""
    from checkpoints import load_checkpoint
    from scoring import RewardScorer
    _, tok, _ = load_checkpoint(ckpt)
    prompt = "What is the capital of France?"
    out = run(capsys, "--ckpt", ckpt, "--prompt", prompt, "--heal", "--temperature", "0",
              "--max-new-tokens", "6", "--device", "cpu", "--score-with", tiny_reward).out
    text, score = out.rsplit("\n[reward model score: ", 1)
    assert text.startswith(prompt)
    expected = RewardScorer(tiny_reward, "cpu", "--score-with")(  # a base model never ends a turn
        [{"role": "user", "content": prompt}], text[len(prompt):], False, tok)
    assert float(score.rstrip("]\n")) == pytest.approx(expected, abs=1e-3)


def test_a_line_too_long_for_the_context_is_refused_and_the_conversation_kept(
        tiny_sft, capsys, monkeypatch):
    import io
    seen = []  # the turns remembered when each line arrives
    prompt_ids = sample.Sampler.prompt_ids
    monkeypatch.setattr(sample.Sampler, "prompt_ids",
                        lambda self, text: seen.append(len(self.history)) or prompt_ids(self, text))
    lines = ["What is the capital of Japan?", "word " * 300, "And of Peru?"]
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(lines) + "\n"))
    err = run(capsys, "--ckpt", tiny_sft, "--interactive", "--max-new-tokens", "4",
              "--temperature", "0", "--device", "cpu").err
    assert "shorten the prompt" in err
    assert seen == [0, 2, 2]  # the refused line forgot nothing


def test_a_prompt_from_standard_input_is_decoded_as_strictly_as_a_file(ckpt, tmp_path, capsys,
                                                                       monkeypatch):
    import io
    monkeypatch.setattr("sys.stdin", io.TextIOWrapper(io.BytesIO(b"caf\xe9 au lait")))
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--prompt-file", "-", "--device", "cpu"])
    assert "-: the prompt is not UTF-8 text" in capsys.readouterr().err
    (tmp_path / "p.txt").write_bytes(b"caf\xe9 au lait")
    with pytest.raises(SystemExit):
        sample.main(["--ckpt", ckpt, "--prompt-file", str(tmp_path / "p.txt"), "--device", "cpu"])
    assert "p.txt: the prompt is not UTF-8 text" in capsys.readouterr().err
