"""Generate text from any checkpoint, in the form that fits its stage.

A base checkpoint is a next-token predictor: the prompt is raw text and the output is its
continuation. An instruct checkpoint (SFT and later) is a chat model: the prompt is a user turn,
rendered in the chat format, and the output is the assistant's answer, which ends at <|end|>.

    python sample.py --ckpt out/base --prompt $'What is the capital of France?\\n'
    python sample.py --ckpt out/sft --prompt "What is the capital of France?"
    python sample.py --ckpt out/sft --system "Answer in one word." --interactive   # chat REPL
    python sample.py --compare out/base out/sft --prompt "What is the capital of France?"
    python sample.py --ckpt out/base --prompt-file prompt.txt --num-samples 3 --temperature 0.8
    echo "Q: What is the chemical symbol for gold?" | python sample.py --prompt-file -
    python sample.py --ckpt out/sft --score-with out/reward --num-samples 3 \\
        --prompt "What is the capital of France?"
    python sample.py --ckpt out/base --heal --prompt 'function calculateTax(amount) {'

With --compare, every checkpoint gets the same request: instruct models as chat, base models as
plain text (the system prompt, if any, on a line before the question). --format chat or text
puts the request to every checkpoint in that form instead: a base model as chat (the role tokens
it never saw in pretraining), an instruct model as raw text. Output streams token by
token. Sampling uses the KV cache; --seed makes it repeatable; --temperature 0 is greedy.
--heal (token healing) lets a plain-text prompt end mid-token: the model rewrites its last
tokens, merged with what follows, as the tokenizer would have written the whole text.
"""
import argparse
import codecs
import json
import math
import os
import sys

import torch

from checkpoints import load_checkpoint
from data import chats
from ground import UserError, die, read_json, seed_arg, sigterm_stops, stop_reason
from model import sample_next
from scoring import RewardScorer
from training import autocast, pick_device, pick_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    which = p.add_mutually_exclusive_group()
    which.add_argument("--ckpt", default="out/base", help="checkpoint folder (default: out/base)")
    which.add_argument("--compare", nargs="+", metavar="DIR",
                       help="run the same prompt through each of these checkpoints")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text (for a chat model: the user's message)")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (- = stdin)")
    src.add_argument("--interactive", action="store_true",
                     help="read prompts line by line (a chat model keeps the conversation)")
    p.add_argument("--system", help="system prompt (chat models; base models see it as text)")
    p.add_argument("--heal", action="store_true", help="token healing, for plain-text prompts "
                   "that end mid-token, such as 'def f(x):' without its newline: the prompt's last "
                   "tokens are taken back and the model writes their text again, free to merge "
                   "it with what follows (one token '):\\n' instead of ')' ':')")
    p.add_argument("--format", choices=["auto", "chat", "text"], default="auto",
                   help="how the prompt is given: auto (chat for sft/ppo checkpoints, text for "
                        "base ones), or the one form for every checkpoint")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the same prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=seed_arg, default=None, help="repeatable sampling")
    p.add_argument("--next-tokens", type=int, default=0, metavar="K", help="after each answer, "
                   "show the K likeliest next tokens with their probabilities (the model's own "
                   "softmax, temperature 1) at its first position")
    p.add_argument("--next-tokens-steps", type=int, default=1, metavar="N",
                   help="... at each of the answer's first N positions")
    p.add_argument("--loss-mask", nargs="?", const="", metavar="CHAT.json", help="show which "
                   "tokens of a chat SFT trains on, in the checkpoint's tokenizer, and exit: a "
                   "JSON file of {\"messages\": [...]} (default: a bundled training chat)")
    p.add_argument("--score-with", metavar="DIR", help="a reward checkpoint (reward.py): print "
                   "its score of every answer, relative to the SFT model's mean (0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    return p.parse_args(argv)


class Sampler:
    def __init__(self, ckpt_dir, args, scorer=None):
        self.args, self.name, self.scorer = args, ckpt_dir, scorer
        self.device = pick_device(args.device)
        self.dtype = pick_dtype(args.dtype, self.device)
        self.model, self.tok, ckpt = load_checkpoint(ckpt_dir, device=self.device,
                                                     flag="--compare" if args.compare else "--ckpt")
        if self.model.head != "lm":
            raise UserError(f"{ckpt_dir} is a '{ckpt['stage']}' checkpoint: it scores answers "
                            "and does not write them; sample from a base or instruct checkpoint")
        self.model.eval()
        self.stage = ckpt["stage"]
        self.chat = chats.prompted_as_chat(args.format, self.stage)
        if args.heal and self.chat:
            print(f"note: {ckpt_dir} is prompted as chat, which --heal leaves as it is",
                  file=sys.stderr)
        self.history = []  # chat turns so far (interactive chat)

    def prompt_ids(self, text):
        system = self.args.system
        head = [{"role": "system", "content": system}] if system else []
        user = [{"role": "user", "content": text}]
        history = self.history
        try:
            if self.chat or system or self.args.compare:  # a request, in the model's form
                ids = chats.request_ids(self.tok, head + history + user, self.chat)
            else:  # raw: <|endoftext|> opens every document
                ids = [self.tok.eot_id] + self.tok.encode(text)
            while history and len(ids) + 16 > self.model.config.block_size:
                history = history[2:]  # the oldest exchange, forgotten if the prompt then fits
                ids = chats.request_ids(self.tok, head + history + user, self.chat)
        except ValueError as e:
            raise UserError(f"prompt: {e}") from None
        ctx = self.model.config.block_size
        if len(ids) >= ctx:  # refused: the conversation so far stays as it was
            raise UserError(f"the prompt is {len(ids)} tokens; the context of {self.name} is "
                            f"{ctx} (shorten the prompt)")
        if len(history) < len(self.history):
            print("note: the conversation is longer than the context; the oldest exchange is "
                  "forgotten", file=sys.stderr)
            self.history = history
        return ids

    def run(self, text, out=None):
        args, tok, out = self.args, self.tok, out or sys.stdout
        prompt = self.prompt_ids(text)
        ids, tail = heal(tok, prompt) if args.heal and not self.chat else (prompt, b"")
        room = self.model.config.block_size - len(ids)
        n = min(args.max_new_tokens, room)
        stops = [tok.eot_id] + ([tok.special("<|end|>")] if self.chat else [])
        kw = dict(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, stop_ids=stops,
                  pad_id=tok.pad_id)
        for number in range(args.num_samples):
            seed = None if args.seed is None else args.seed + number
            if args.num_samples > 1:
                print(f"--- sample {number + 1}", file=out)
            # stream: print each token as it arrives; the incremental decoder holds back the
            # bytes of a character split across tokens until it is complete
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            if not self.chat:  # through the decoder: --heal may cut a character in two
                out.write(decoder.decode(tok.decode_bytes(ids[1:])))
            reply, ended, lead = [], None, self.chat
            with autocast(self.device, self.dtype):
                for t in self.answer_tokens(ids, tail, n, seed, kw):
                    if t in stops:
                        ended = tok.decode([t])
                        break
                    reply.append(t)
                    piece = decoder.decode(tok.decode_bytes([t]))
                    if lead and piece:  # the space before a turn's text (encode_turn)
                        piece, lead = piece[piece.startswith(" "):], False
                    out.write(piece)
                    out.flush()
            out.write(decoder.decode(b"", final=True) + "\n")
            out.flush()
            if ended == "<|endoftext|>":
                print("[the model ended the document here]", file=sys.stderr)
            elif not ended and len(reply) == n < args.max_new_tokens:  # said only when it cut
                print(f"[cut: the context is full; {room} tokens were left for this answer]",
                      file=sys.stderr)
            elif self.chat and not ended:
                print("[no end of turn: the answer was cut at --max-new-tokens]", file=sys.stderr)
            if args.next_tokens:
                self.show_next_tokens(ids, reply, out)
            if self.scorer:
                system = [{"role": "system", "content": args.system}] if args.system else []
                request = system + (self.history if self.chat else []) + [
                    {"role": "user", "content": text}]
                answer = (tok.decode_turn(reply) if self.chat else
                          tok.decode_bytes(reply)[len(tail):].decode(errors="replace"))
                score = self.scorer(request, answer, ended == "<|end|>", tok)
                print(f"[reward model score: {score:+.3f}]", file=out, flush=True)
        if self.chat and args.interactive:
            self.history += [{"role": "user", "content": text},
                             {"role": "assistant", "content": tok.decode(reply).strip() or "..."}]

    def answer_tokens(self, ids, tail, n, seed, kw):
        """The answer's token ids as they come: with --heal, first those that write the prompt's
        taken-back bytes `tail` again (healed_start), then the model's own continuation."""
        head = healed_start(self.model, self.tok, ids, tail, self.args, seed, self.device)
        yield from head[:n]
        if n > len(head):
            for t in self.model.stream([ids + head], n - len(head), seed=seed, **kw):
                yield t.item()

    def show_next_tokens(self, ids, reply, out):
        """One line per position of the answer (the first --next-tokens-steps): the likeliest next
        tokens there and their probabilities, and the token that was generated."""
        for step in range(min(self.args.next_tokens_steps, len(reply) + 1)):
            with autocast(self.device, self.dtype):
                top = self.model.top_next_tokens(ids + reply[:step], self.args.next_tokens)
            shown = ", ".join(f"{json.dumps(self.tok.decode([t]))} {p:.3f}" for t, p in top)
            then = (f"; generated {json.dumps(self.tok.decode([reply[step]]))}"
                    if step < len(reply) else "")
            print(f"[next token {step + 1}: {shown}{then}]", file=out, flush=True)


def heal(tok, ids):
    """Token healing, step 1: take back the prompt's last tokens, as many as together begin a
    longer token, so that the model can write their bytes again, merged with what follows, as the
    corpus was tokenized (" {" -> " {\n"; ")" ":" -> "):\n"). Returns (the ids left, the bytes
    taken back: b"" when no token is longer than the prompt's end)."""
    longest, taken = max(map(len, tok.tokens)), 0
    for k in range(1, len(ids)):  # ids[0], <|endoftext|>, is never taken back
        tail = b"".join(tok.tokens[i] for i in ids[-k:])
        if len(tail) >= longest:
            break
        if any(len(token) > len(tail) and token.startswith(tail) for token in tok.tokens):
            taken = k
    return ids[:len(ids) - taken], b"".join(tok.tokens[i] for i in ids[len(ids) - taken:])


@torch.no_grad()
def healed_start(model, tok, ids, tail, args, seed, device):
    """Token healing, step 2: the answer's first tokens, one at a time, each the model's choice
    (greedy or sampled, as asked) among the tokens that go on writing `tail`: one that is a part
    of what is left of it, or one that begins with all of it. The prompt's own tokens stay
    possible: healing can only add a merge, never take the prompt's text away."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    head = []
    while tail:
        allowed = continuing(tok, tail)
        logits = model(torch.tensor([ids + head], device=device))[0][:, -1].float()
        blocked = torch.ones_like(logits, dtype=torch.bool)
        blocked[:, allowed] = False
        head.append(sample_next(logits.masked_fill(blocked, float("-inf")), args.temperature,
                                args.top_k, args.top_p, gen).item())
        tail = tail[len(tok.tokens[head[-1]]):]
    return head


def continuing(tok, tail):
    """The tokens that may come next while `tail` is being written: a part of what is left of it
    (the prompt's own split stays possible), or one that begins with all of it (a merge)."""
    return [i for i, token in enumerate(tok.tokens)
            if token.startswith(tail) or tail.startswith(token)]


def masked_tokens(tok, messages):
    """A chat token by token as SFT sees it: [(token text, trained)], trained = the loss mask of
    render_chat (the assistant's words and its <|end|>: the tokens the loss is taken on)."""
    ids, mask = tok.render_chat(messages)
    return [(tok.decode([t]), bool(m)) for t, m in zip(ids, mask)]


def show_loss_mask(args):
    """Print --loss-mask's chat with its trained tokens in green (a terminal) or [brackets]."""
    _, tok, _ = load_checkpoint(args.ckpt, device="cpu")
    if args.loss_mask:
        messages = read_json(args.loss_mask)  # unreadable, not UTF-8, not JSON: one line
        try:
            tokens = masked_tokens(tok, messages["messages"])
        except (ValueError, KeyError, TypeError) as e:
            raise UserError(f"--loss-mask {args.loss_mask}: expected a JSON file of "
                            f'{{"messages": [...]}} ending with an assistant turn ({e})') from None
    else:
        tokens = masked_tokens(tok, chats.sft_records(n=1)[0]["messages"])
    on, off = ("\033[42m", "\033[0m") if sys.stdout.isatty() else ("[", "]")
    text, trained = "", False
    for piece, mask in tokens + [("", False)]:
        if mask != trained:
            text, trained = text + (on if mask else off), mask
        text += piece
    print(text)
    print(f"({sum(m for _, m in tokens)} of {len(tokens)} tokens trained; "
          f"{'green' if on != '[' else 'in brackets'})")


def talk(sampler):
    """--interactive: one prompt a line until end of input; a refused line is an error message,
    and the session (and a chat's history) goes on."""
    while True:
        try:
            line = input("you> " if sampler.chat else "> ")
            line.encode("utf-8")  # undecodable bytes arrive as lone surrogates
        except EOFError:
            print()  # end the prompt's line
            return
        except (UnicodeDecodeError, UnicodeEncodeError):
            print("error: that line is not UTF-8 text", file=sys.stderr)
            continue
        if sampler.chat and not sys.stdin.isatty():
            print(line)  # piped: show the message, so the answer does not follow "you> "
        elif not sampler.chat:
            line += "\n"  # what was typed: a base model continues on the next line
        try:
            if line.strip():
                sampler.run(line)
        except UserError as e:  # a bad prompt does not end the session
            print(f"error: {e}", file=sys.stderr)


def read_prompt(path):
    """--prompt-file: the file's text, or standard input's for "-", both decoded strictly."""
    try:
        if path == "-":
            return sys.stdin.buffer.read().decode("utf-8")
        with open(path, "rb") as f:
            return f.read().decode("utf-8")
    except OSError as e:
        raise UserError(f"{path}: cannot read the prompt ({e})") from e
    except UnicodeDecodeError:
        raise UserError(f"{path}: the prompt is not UTF-8 text") from None


@sigterm_stops()  # SIGTERM stops it as Ctrl-C does
def main(argv=None):
    args = parse_args(argv)
    try:
        if (args.max_new_tokens < 1 or args.num_samples < 1
                or (args.top_k is not None and args.top_k < 1)):
            raise UserError("--max-new-tokens, --num-samples and --top-k must be at least 1")
        if args.next_tokens < 0 or args.next_tokens_steps < 1:
            raise UserError("--next-tokens must be at least 0 and --next-tokens-steps at least 1")
        if (not 0 <= args.temperature < math.inf
                or (args.top_p is not None and not 0 < args.top_p <= 1)):
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        if args.interactive and args.compare:
            raise UserError("--interactive talks to one checkpoint: use --ckpt, not --compare")
        if args.loss_mask is not None:
            return show_loss_mask(args)
        scorer = (RewardScorer(args.score_with, pick_device(args.device), "--score-with")
                  if args.score_with else None)
        samplers = [Sampler(d, args, scorer) for d in (args.compare or [args.ckpt])]
        if args.interactive:
            return talk(samplers[0])
        text = read_prompt(args.prompt_file) if args.prompt_file else (args.prompt or "")
        for sampler in samplers:
            if args.compare:
                form = "chat" if sampler.chat else "plain text"
                print(f"\n=== {sampler.name} ({sampler.stage} model, prompted as {form}) ===",
                      flush=True)
            sampler.run(text)
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt as e:
        sys.exit(f"\nstopped: {stop_reason(e)}")
    except BrokenPipeError:  # the reader left (`| head`): stop quietly, as other tools do
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        sys.exit(1)


if __name__ == "__main__":
    main()
