"""The stages side by side in a browser: a page on this machine (localhost only) that puts one
request to several checkpoints and streams their answers in columns, a token of each in turn.

    python serve.py out/base out/sft out/ppo --reward-model out/reward
    # then open http://127.0.0.1:8000

Each checkpoint answers in the form that fits its stage: a base model continues the request as
plain text (the system prompt on a line before the question), an instruct model (SFT, PPO)
answers it as chat; the page's format menu can put it to every model in one form instead, as
sample.py --format does. Click a generated token to see, for every model, the likeliest next
tokens at that point of that answer (each model's own softmax, temperature 1, on its own prompt
followed by the answer so far). With --reward-model, each answer gets the reward model's score;
when the request asks about an entity of the bundled world, the teacher (data/teacher.py) gives
its verdict on each answer.

Only the standard library serves it (http.server). One request runs at a time and the others
wait (at most --queue of them; more are told the server is busy); a closed tab stops its
generation within a token or two (at the first write that fails).

Endpoints (JSON; the page itself is web/index.html):
  GET  /api/models    the checkpoints (name, stage), the reward model if any, the device
  POST /api/generate  {"prompt", "system"?, "temperature"?, "max_new_tokens"?, "format"?, "seed"?}
                      -> JSON lines: {"event": "start" | "token" | "done" | "end" | "error", ...}
  POST /api/next      the same fields and {"answer": [token ids], "k"?}
                      -> {"position", "models": [{"name", "top": [{"id", "text", "prob"}]}]}
A bad request gets status 400 and {"error": "..."} (413: a body over 64 KiB), a full queue 503; a
failure once the stream has begun ends it with {"event": "error", "error": "..."}.
"""
import argparse
import codecs
import contextlib
import errno
import json
import os
import threading
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from checkpoints import INSTRUCT_STAGES, load_checkpoint
from data import chats, teacher
from ground import UserError, die, sigterm_stops
from scoring import RewardScorer
from training import autocast, pick_device, pick_dtype

HOST = "127.0.0.1"  # never another interface: the page runs models for whoever reaches it
PAGE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "index.html")
MAX_BODY = 1 << 16  # bytes of a request body: prompts are short


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", metavar="DIR",
                   help="checkpoint folders (base, sft or ppo), one column each, in this order")
    p.add_argument("--reward-model", metavar="DIR", help="a reward checkpoint (reward.py): its "
                   "score of every answer, relative to the SFT model's mean (0)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free one (default: 8000)")
    p.add_argument("--queue", type=int, default=8,
                   help="requests that may wait while one runs; more are answered 'busy'")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | mps")
    p.add_argument("--dtype", default="auto", help="auto | float32 | bfloat16 | float16")
    return p.parse_args(argv)


class BadRequest(Exception):
    """A request the server cannot serve: answered with `status` and the message, never a crash."""

    def __init__(self, message, status=400):
        super().__init__(message)
        self.status = status


def field(body, name, kind, default, check, rule):
    """body[name] as `kind` (or `default` when absent); BadRequest naming the rule otherwise."""
    value = body.get(name)
    if value is None:  # absent, or null
        value = default
        if value is None:
            return None
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or isinstance(value, bool) or not check(value):
        raise BadRequest(f"{name}: expected {rule}, got {json.dumps(body.get(name))[:40]}")
    return value


class Models:
    """The checkpoints of one pipeline (one tokenizer), the reward model, and the lock that lets
    one request at a time use them."""

    def __init__(self, dirs, reward_dir=None, device="auto", dtype="auto", queue=8):
        self.device = pick_device(device)
        self.dtype = pick_dtype(dtype, self.device)
        self.columns = []
        for d in dirs:
            model, tok, ckpt = load_checkpoint(d, ["base", *INSTRUCT_STAGES], self.device,
                                               "serve.py")
            if self.columns and tok.checksum != self.tok.checksum:
                raise UserError(f"{d} has another tokenizer than {self.columns[0]['name']}: the "
                                "page compares the checkpoints of one pipeline")
            self.tok = tok
            self.columns.append({"name": d.rstrip("/"), "stage": ckpt["stage"],
                                 "model": model.eval()})
        self.scorer = (RewardScorer(reward_dir, self.device, "--reward-model")
                       if reward_dir else None)
        if self.scorer and self.scorer.tok.checksum != self.tok.checksum:
            raise UserError(f"--reward-model {reward_dir}: another tokenizer than the checkpoints'")
        self.lock, self.slots = threading.Lock(), threading.BoundedSemaphore(queue + 1)
        self.tokens_generated = 0  # over the server's life (the tests read it: a tab closed
        # mid-answer must stop the generation, not only the writing)

    def describe(self):
        return {"models": [{"name": c["name"], "stage": c["stage"]} for c in self.columns],
                "reward_model": self.scorer is not None, "device": self.device}

    def parse(self, body):
        """The request fields every endpoint shares, checked."""
        if not isinstance(body, dict):
            raise BadRequest("expected a JSON object")
        prompt = field(body, "prompt", str, "", lambda v: v.strip(), "a non-empty string")
        system = field(body, "system", str, "", lambda v: True, "a string").strip() or None
        return {"messages": ([{"role": "system", "content": system}] if system else [])
                + [{"role": "user", "content": prompt}],
                "temperature": field(body, "temperature", float, 0.0,
                                     lambda v: 0 <= v <= 5, "a number from 0 to 5"),
                "max_new_tokens": field(body, "max_new_tokens", int, 48,
                                        lambda v: v >= 1, "a whole number >= 1"),
                "format": field(body, "format", str, "auto",
                                lambda v: v in ("auto", "chat", "text"), "auto, chat or text"),
                "seed": field(body, "seed", int, None, lambda v: 0 <= v < 2 ** 63,
                              "a whole number from 0 to 2**63 - 1")}

    def prompt_ids(self, column, req):
        """What this column's model reads: the chat format, or the request as plain text opened
        by <|endoftext|> (a base model's form); BadRequest when it fills the context."""
        chat = chats.prompted_as_chat(req["format"], column["stage"])
        try:
            ids = chats.request_ids(self.tok, req["messages"], chat)
        except ValueError as e:
            raise BadRequest(f"prompt: {e}") from None
        context = column["model"].config.block_size
        if len(ids) >= context:
            raise BadRequest(f"the prompt is {len(ids)} tokens; the context of {column['name']} "
                             f"is {context}: shorten it")
        return ids, chat

    def generate(self, req, prompts, send):
        """Every column's answer to its prompt (prompt_ids), a token of each in turn, as events
        to send(event). send raises ConnectionError once the browser has gone: generation stops."""
        item = teacher.lookup(req["messages"])
        send({"event": "start", "teacher": item and {k: item[k] for k in
                                                     ("kind", "entity", "gold", "claim")},
              "prompts": [{"text": self.tok.decode(ids), "form": "chat" if chat else "text"}
                          for ids, chat in prompts]})
        end_of_turn = self.tok.special("<|end|>")
        answers = []
        for column, (ids, chat) in zip(self.columns, prompts):
            stops = [self.tok.eot_id] + ([end_of_turn] if chat else [])
            n = min(req["max_new_tokens"], column["model"].config.block_size - len(ids))
            answers.append({"ids": [], "stops": stops, "chat": chat,
                            "decoder": codecs.getincrementaldecoder("utf-8")(errors="replace"),
                            "stream": column["model"].stream(
                                [ids], n, temperature=req["temperature"], stop_ids=stops,
                                seed=req["seed"], pad_id=self.tok.pad_id)})
        with autocast(self.device, self.dtype):
            while any(answer["stream"] for answer in answers):
                for i, answer in enumerate(answers):
                    if answer["stream"]:
                        self.step(i, answer, req, item, send)
        send({"event": "end"})

    def step(self, i, answer, req, item, send):
        """One token of column i's answer (or its end: the done event with score and verdict)."""
        token = next(answer["stream"], None)
        if token is not None and token.item() not in answer["stops"]:
            self.tokens_generated += 1
            answer["ids"].append(token.item())
            piece = answer["decoder"].decode(self.tok.decode_bytes([token.item()]))
            if answer["chat"] and len(answer["ids"]) == 1:  # the space before a turn's text
                piece = piece[piece.startswith(" "):]
            send({"event": "token", "model": i, "id": token.item(), "text": piece})
            return
        answer["stream"] = None
        tail = answer["decoder"].decode(b"", final=True)  # a character cut at the last token
        ended = self.tok.decode([token.item()]) if token is not None else None
        text = (self.tok.decode_turn if answer["chat"] else self.tok.decode)(answer["ids"])
        score = verdict = None
        if self.scorer:
            score = self.scorer(req["messages"], text, ended == "<|end|>", self.tok)
        if item:
            verdict = teacher.judge(item, text, ended == "<|end|>")
        send({"event": "done", "model": i, "text": text, "tail": tail, "ended": ended,
              "tokens": len(answer["ids"]), "score": score, "verdict": verdict})

    def next_tokens(self, req, body):
        """After `answer` (token ids: the start of one column's answer), every column's k
        likeliest next tokens, each on its own prompt followed by those tokens."""
        answer = field(body, "answer", list, [], lambda v: all(
            isinstance(t, int) and 0 <= t < self.tok.n_vocab for t in v), "a list of token ids")
        k = field(body, "k", int, 10, lambda v: 1 <= v <= 100, "a whole number from 1 to 100")
        out = []
        for column in self.columns:
            ids = self.prompt_ids(column, req)[0] + answer
            if len(ids) > column["model"].config.block_size:
                out.append({"name": column["name"], "top": None})
                continue
            with autocast(self.device, self.dtype):
                top = column["model"].top_next_tokens(ids, k)
            out.append({"name": column["name"], "top": [
                {"id": t, "text": self.tok.decode([t]), "prob": p} for t, p in top]})
        return {"position": len(answer), "models": out}


class Handler(BaseHTTPRequestHandler):
    server_version = "serve.py"

    def do_GET(self):
        if self.path in ("/", "/index.html"):
            with open(PAGE, "rb") as f:
                self.reply(200, f.read(), "text/html; charset=utf-8")
        elif self.path == "/favicon.ico":
            self.reply(204, b"", "image/x-icon")  # none: the browser asks for it anyway
        elif self.path == "/api/models":
            self.reply_json(200, self.server.models.describe())
        else:
            self.reply_json(404, {"error": f"no page {self.path}"})

    def do_POST(self):
        models = self.server.models
        if self.path not in ("/api/generate", "/api/next"):
            return self.reply_json(404, {"error": f"no endpoint {self.path}"})
        if not models.slots.acquire(blocking=False):
            return self.reply_json(503, {"error": "busy: too many requests are waiting; "
                                                  "try again in a moment"})
        streaming = False
        try:
            body = self.read_json()
            req = models.parse(body)
            with models.lock:  # the others wait here (a plain lock: in no fixed order)
                if self.path == "/api/next":
                    return self.reply_json(200, models.next_tokens(req, body))
                # every prompt before the status line: a bad one gets a 400, not a broken stream
                prompts = [models.prompt_ids(column, req) for column in models.columns]
                self.send_response(200)
                self.send_header("Content-Type", "application/x-ndjson")
                self.send_header("Cache-Control", "no-store")
                self.end_headers()
                streaming = True
                models.generate(req, prompts, self.send_event)
        except ConnectionError:
            pass  # the tab was closed: its generation stops here
        except BadRequest as e:
            self.fail(e.status, str(e), streaming)
        except Exception as e:  # noqa: BLE001 - a bug, or the device (out of memory): keep serving
            traceback.print_exc()
            self.fail(500, f"{type(e).__name__}: {e}", streaming)
        finally:
            models.slots.release()

    def fail(self, status, message, streaming):
        """The error, as a status (before the stream began) or as the stream's last event."""
        with contextlib.suppress(ConnectionError):  # the browser may be gone too
            if streaming:
                self.send_event({"event": "error", "error": message})
            else:
                self.reply_json(status, {"error": message})

    def read_json(self):
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if not 0 <= length <= MAX_BODY:
            raise BadRequest(f"Content-Length: expected 0 to {MAX_BODY} bytes, got "
                             f"{self.headers.get('Content-Length')}", 413 if length > 0 else 400)
        try:
            return json.loads(self.rfile.read(length) or b"null")
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadRequest(f"not JSON: {e}") from None
        except RecursionError:
            raise BadRequest("not JSON this server reads: nested too deeply") from None

    def send_event(self, event):
        self.wfile.write(json.dumps(event).encode() + b"\n")
        self.wfile.flush()

    def reply_json(self, status, obj):
        self.reply(status, json.dumps(obj).encode(), "application/json")

    def reply(self, status, data, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, format, *args):  # errors only: a page makes many requests
        if len(args) > 1 and str(args[1])[:1] in "45":
            super().log_message(format, *args)


def make_server(models, port):
    """The HTTP server on localhost (port 0: a free one); its threads serve requests at once."""
    try:
        server = ThreadingHTTPServer((HOST, port), Handler)
    except OSError as e:
        if e.errno == errno.EADDRINUSE:
            raise UserError(f"--port {port} is in use: pick another (0: a free one)") from None
        raise UserError(f"--port {port}: cannot serve there ({e.strerror or e})") from None
    server.daemon_threads = True  # Ctrl-C does not wait for open streams
    server.models = models
    return server


@sigterm_stops()  # SIGTERM stops it as Ctrl-C does
def main(argv=None):
    args = parse_args(argv)
    try:
        if not 0 <= args.port < 65536:
            raise UserError(f"--port {args.port}: expected 0 to 65535")
        if args.queue < 0:
            raise UserError(f"--queue {args.queue}: expected 0 or more")
        models = Models(args.ckpts, args.reward_model, args.device, args.dtype, args.queue)
        server = make_server(models, args.port)
    except UserError as e:
        die(str(e))
    names = ", ".join(f"{c['name']} ({c['stage']})" for c in models.columns)
    print(f"serving {names} on http://{HOST}:{server.server_address[1]} (Ctrl-C stops)",
          flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        print("\nstopped")
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
