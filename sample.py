"""Generate text from any checkpoint.

A base checkpoint is a next-token predictor, so the prompt is raw text and the output is its
continuation. Ask it a question and watch what it does with it:

    python sample.py --ckpt out/base --prompt "What is the capital of France?"
    python sample.py --ckpt out/base --prompt-file prompt.txt --num-samples 3 --temperature 0.8
    echo "Q: What is the symbol for gold?" | python sample.py --prompt-file -
    python sample.py --ckpt out/base --interactive      # one prompt per line, Ctrl-D to quit

Output streams token by token. Sampling uses the KV cache; --seed makes it repeatable;
--temperature 0 is greedy.
"""
import argparse
import codecs
import sys

from common import UserError, autocast, die, load_checkpoint, pick_device, pick_dtype


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--ckpt", default="out/base", help="checkpoint folder (default: out/base)")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--prompt", help="the prompt text")
    src.add_argument("--prompt-file", metavar="FILE", help="read the prompt from FILE (- = stdin)")
    src.add_argument("--interactive", action="store_true", help="read prompts line by line")
    p.add_argument("--max-new-tokens", type=int, default=100)
    p.add_argument("--num-samples", type=int, default=1, help="continuations of the same prompt")
    p.add_argument("--temperature", type=float, default=0.8, help="0 = greedy")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k likeliest tokens")
    p.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold")
    p.add_argument("--seed", type=int, default=None, help="repeatable sampling")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    return p.parse_args(argv)


class Sampler:
    def __init__(self, a):
        self.a = a
        self.device = pick_device(a.device)
        self.dtype = pick_dtype(a.dtype, self.device)
        self.model, self.tok, self.ckpt = load_checkpoint(a.ckpt, device=self.device)
        self.model.eval()

    def prompt_ids(self, text):
        ids = [self.tok.eot_id] + self.tok.encode(text)  # <|endoftext|> opens every document
        ctx = self.model.config.block_size
        if len(ids) >= ctx:
            raise UserError(f"the prompt is {len(ids)} tokens; this model's context is {ctx} "
                            "(shorten the prompt)")
        return ids

    def run(self, text, out=None):
        a, tok, out = self.a, self.tok, out or sys.stdout
        ids = self.prompt_ids(text)
        room = self.model.config.block_size - len(ids)
        n = min(a.max_new_tokens, room)
        if n < a.max_new_tokens:
            print(f"note: only {room} tokens of context left; generating {n}", file=sys.stderr)
        kw = dict(temperature=a.temperature, top_k=a.top_k, top_p=a.top_p,
                  stop_ids=[tok.eot_id], pad_id=tok.pad_id)
        for s in range(a.num_samples):
            seed = None if a.seed is None else a.seed + s
            if a.num_samples > 1:
                print(f"--- sample {s + 1}", file=out)
            # stream: print each token as it arrives; the incremental decoder holds back the
            # bytes of a character split across tokens until it is complete
            decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
            out.write(text)
            ended = False
            with autocast(self.device, self.dtype):
                for t in self.model.stream([ids], n, seed=seed, **kw):
                    if t.item() == tok.eot_id:
                        ended = True
                        break
                    out.write(decoder.decode(tok.decode_bytes([t.item()])))
                    out.flush()
            out.write(decoder.decode(b"", final=True) + "\n")
            out.flush()
            if ended:
                print("[the model ended the document here]", file=sys.stderr)


def main(argv=None):
    a = parse_args(argv)
    try:
        if a.max_new_tokens < 1 or a.num_samples < 1 or (a.top_k is not None and a.top_k < 1):
            raise UserError("--max-new-tokens, --num-samples and --top-k must be at least 1")
        if a.temperature < 0 or (a.top_p is not None and not 0 < a.top_p <= 1):
            raise UserError("--temperature must be >= 0 and --top-p in (0, 1]")
        s = Sampler(a)
        if a.interactive:
            while True:
                try:
                    line = input("> ")
                except EOFError:
                    break
                try:
                    if line.strip():
                        s.run(line)
                except UserError as e:  # a bad prompt does not end the session
                    print(f"error: {e}", file=sys.stderr)
            return
        if a.prompt_file:
            try:
                text = sys.stdin.read() if a.prompt_file == "-" else open(a.prompt_file).read()
            except (OSError, UnicodeDecodeError) as e:
                raise UserError(f"{a.prompt_file}: cannot read the prompt ({e})") from e
        else:
            text = a.prompt if a.prompt is not None else ""
        s.run(text)
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt:
        print(file=sys.stderr)


if __name__ == "__main__":
    main()
