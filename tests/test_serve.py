"""serve.py's endpoints, on a real server on a free localhost port with the tiny checkpoints: the
streamed answers are the models' own, the next-token tables their softmax, the reward score and
the teacher's verdict those of scoring.RewardScorer and data/teacher.py; bad requests get a
status and a message, concurrent requests queue, and a closed connection stops generation.
The page itself is checked in a real browser by tests/browser_check.py."""
import http.client
import json
import socket
import threading
import time

import pytest
import torch

import serve
from data import chats, teacher
from scoring import RewardScorer

FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(tiny_base, tiny_sft, tiny_reward):
    models = serve.Models([tiny_base, tiny_sft], tiny_reward, device="cpu", queue=2)
    httpd = serve.make_server(models, 0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def call(server, method, path, body=None):
    """(status, decoded JSON, or the list of JSON lines of a stream)."""
    conn = http.client.HTTPConnection("127.0.0.1", server.server_address[1], timeout=120)
    conn.request(method, path, body if isinstance(body, (str, type(None))) else json.dumps(body))
    res = conn.getresponse()
    data = res.read().decode()
    conn.close()
    if res.getheader("Content-Type") == "application/x-ndjson":
        return res.status, [json.loads(line) for line in data.splitlines()]
    return res.status, json.loads(data) if "json" in res.getheader("Content-Type") else data


def test_page_and_models(server, tiny_base, tiny_sft):
    status, page = call(server, "GET", "/")
    assert status == 200 and "/api/generate" in page and 'id="temperature"' in page
    status, info = call(server, "GET", "/api/models")
    assert status == 200 and info["reward_model"] is True
    assert info["models"] == [{"name": tiny_base, "stage": "base"},
                              {"name": tiny_sft, "stage": "sft"}]
    assert call(server, "GET", "/nope")[0] == 404


def test_generate_streams_each_models_own_answer(server, tiny_reward):
    """Greedy: each column's tokens are what model.generate gives for that model's own form of
    the request (the base model as plain text, the SFT model as chat), interleaved a token of
    each in turn; the done event carries the reward model's score and the teacher's verdict."""
    status, events = call(server, "POST", "/api/generate",
                          {"prompt": FRANCE, "system": "Answer in one word.", "max_new_tokens": 12})
    assert status == 200 and events[0]["event"] == "start" and events[-1] == {"event": "end"}
    assert events[0]["teacher"] == {"kind": "capital", "entity": "France", "gold": "Paris",
                                    "claim": None}
    models, tok = server.models.columns, server.models.tok
    messages = [{"role": "system", "content": "Answer in one word."},
                {"role": "user", "content": FRANCE}]
    prompts = [[tok.eot_id] + tok.encode(chats.plain_prompt(messages)),
               tok.render_chat(messages, for_completion=True)[0]]
    assert [p["text"] for p in events[0]["prompts"]] == [tok.decode(p) for p in prompts]
    scorer = RewardScorer(tiny_reward, "cpu", "--reward-model")
    end = tok.special("<|end|>")
    for i, (column, ids) in enumerate(zip(models, prompts)):
        stops = [tok.eot_id] + ([end] if i else [])
        want = column["model"].generate([ids], 12, temperature=0.0, stop_ids=stops)[0]
        reply = [t for t in want if t not in stops]
        tokens = [e for e in events if e["event"] == "token" and e["model"] == i]
        assert [e["id"] for e in tokens] == reply
        done = next(e for e in events if e["event"] == "done" and e["model"] == i)
        text = tok.decode_turn(reply) if i else tok.decode(reply)  # chat: without the space
        assert done["text"] == text == "".join(e["text"] for e in tokens)
        ended = want[-1] in stops and tok.decode([want[-1]]) == "<|end|>"
        assert done["score"] == pytest.approx(scorer(messages, done["text"], ended, tok), abs=1e-5)
        assert done["verdict"] == teacher.judge(teacher.lookup(messages), done["text"], ended)
    first = [e["model"] for e in events if e["event"] == "token"][:2]
    assert first == [0, 1]  # a token of each in turn, not one answer after the other


def test_format_and_no_teacher(server):
    """format=chat puts the request to the base model as chat too; a request the teacher knows
    nothing about has no verdicts."""
    status, events = call(server, "POST", "/api/generate", {"prompt": "Tell me a story.",
                          "format": "chat", "max_new_tokens": 4, "temperature": 1.0, "seed": 3})
    assert status == 200 and [p["form"] for p in events[0]["prompts"]] == ["chat", "chat"]
    assert events[0]["teacher"] is None
    assert all(e["verdict"] is None for e in events if e["event"] == "done")
    again = call(server, "POST", "/api/generate", {"prompt": "Tell me a story.", "format": "chat",
                 "max_new_tokens": 4, "temperature": 1.0, "seed": 3})[1]
    assert again == events  # a seed makes sampling repeatable


def test_next_tokens_are_each_models_softmax(server):
    """At position p of column 1's answer, every column's top-k is its softmax on its own prompt
    followed by those p answer tokens: sorted, summing to at most 1."""
    answer = server.models.tok.encode(" The capital")
    status, out = call(server, "POST", "/api/next", {"prompt": FRANCE, "answer": answer, "k": 5})
    assert status == 200 and out["position"] == len(answer) and len(out["models"]) == 2
    tok = server.models.tok
    messages = [{"role": "user", "content": FRANCE}]
    prompts = [[tok.eot_id] + tok.encode(chats.plain_prompt(messages)),
               tok.render_chat(messages, for_completion=True)[0]]
    for column, ids, shown in zip(server.models.columns, prompts, out["models"]):
        with torch.no_grad():
            probs = column["model"](torch.tensor([ids + answer]))[0][0, -1].softmax(-1).topk(5)
        assert [t["id"] for t in shown["top"]] == probs.indices.tolist()
        assert [t["prob"] for t in shown["top"]] == pytest.approx(probs.values.tolist(), abs=1e-6)
        assert [t["text"] for t in shown["top"]] == [tok.decode([t]) for t in probs.indices]
        assert sum(t["prob"] for t in shown["top"]) <= 1 + 1e-6


@pytest.mark.parametrize("path,body,status,says", [
    ("/api/generate", {"prompt": "word " * 200}, 400, "the context of"),
    ("/api/generate", {"prompt": "  "}, 400, "prompt: expected a non-empty string"),
    ("/api/generate", {"prompt": "hi", "temperature": -1}, 400, "temperature: expected"),
    ("/api/generate", {"prompt": "hi", "format": "html"}, 400, "format: expected auto, chat"),
    ("/api/generate", "{not json", 400, "not JSON"),
    ("/api/generate", "[" * 20_000 + "]" * 20_000, 400, "nested too deeply"),
    ("/api/generate", [1, 2], 400, "expected a JSON object"),
    ("/api/generate", {"prompt": "hi", "seed": 2 ** 64}, 400, "seed: expected a whole number"),
    ("/api/next", {"prompt": "hi", "k": 0}, 400, "k: expected a whole number from 1 to 100"),
    ("/api/next", {"prompt": "hi", "answer": [1, -1]}, 400, "answer: expected a list of token"),
    ("/api/nope", {}, 404, "no endpoint"),
])
def test_bad_requests_get_a_status_and_a_message(server, path, body, status, says):
    got, out = call(server, "POST", path, body)
    assert got == status and says in out["error"]
    assert call(server, "GET", "/api/models")[0] == 200  # and the server is still up


def test_concurrent_requests_queue_or_are_told_busy(server):
    """Eight requests while one runs, with room for that one and two waiting: five are told
    'busy' at once, three wait and then each gets a whole answer, and the server goes on."""
    results = []

    def ask():
        results.append(call(server, "POST", "/api/generate", {"prompt": FRANCE,
                                                             "max_new_tokens": 8}))
    threads = [threading.Thread(target=ask) for _ in range(8)]
    with server.models.lock:  # a request is running
        for t in threads:
            t.start()
        for _ in range(600):
            if len(results) == 5:
                break
            time.sleep(0.1)
        assert [status for status, _ in results] == [503] * 5
        assert all("busy" in out["error"] for _, out in results)
    for t in threads:
        t.join(timeout=300)
    assert [status for status, _ in results[5:]] == [200] * 3
    assert all(events[-1] == {"event": "end"} for _, events in results[5:])
    assert call(server, "POST", "/api/generate", {"prompt": FRANCE, "max_new_tokens": 2})[0] == 200


def raw_post(server, path, body, length=None):
    """A POST written by hand (for a Content-Length no client library would send); the socket."""
    sock = socket.create_connection(server.server_address, timeout=60)
    sock.sendall(b"POST %s HTTP/1.1\r\nHost: x\r\nContent-Length: %s\r\n\r\n%s"
                 % (path.encode(), str(len(body) if length is None else length).encode(), body))
    return sock


def receive_until(sock, marker):
    received = b""
    while marker not in received:
        chunk = sock.recv(4096)
        assert chunk, f"the server closed the connection before {marker}: {received[-300:]}"
        received += chunk
    return received


def test_a_closed_connection_stops_generation(server):
    """The browser leaves after the first token: the server stops within a few tokens instead of
    writing the rest of both answers."""
    body = {"prompt": "The", "format": "text", "max_new_tokens": 100}
    before = server.models.tokens_generated
    call(server, "POST", "/api/generate", body)
    whole = server.models.tokens_generated - before
    assert whole >= 60  # enough to tell stopping from finishing
    before = server.models.tokens_generated
    with raw_post(server, "/api/generate", json.dumps(body).encode()) as sock:
        receive_until(sock, b'"event": "token"')
    with server.models.lock:  # taken once the cancelled request has let go
        stopped_after = server.models.tokens_generated - before
    assert stopped_after < whole / 2


@pytest.mark.parametrize("length", ["-5", "lots", str(serve.MAX_BODY + 1)])
def test_a_bad_content_length_is_refused(server, length):
    with raw_post(server, "/api/generate", b"{}", length) as sock:
        head = receive_until(sock, b"\r\n\r\n")
    assert head.split(b" ")[1] in (b"400", b"413")


def test_a_failure_mid_stream_ends_it_with_an_error_event(server, monkeypatch, capsys):
    def broken(*args):
        raise RuntimeError("the judge broke")
    monkeypatch.setattr(serve.teacher, "judge", broken)
    status, events = call(server, "POST", "/api/generate", {"prompt": FRANCE, "max_new_tokens": 3})
    assert status == 200 and events[-1] == {"event": "error",
                                            "error": "RuntimeError: the judge broke"}
    assert "the judge broke" in capsys.readouterr().err  # and the traceback is in the log
    monkeypatch.undo()
    assert call(server, "POST", "/api/generate", {"prompt": FRANCE, "max_new_tokens": 2})[0] == 200


def test_startup_errors_are_one_line(tiny_sft, tiny_reward, tmp_path, capsys):
    for args, says in [([str(tmp_path / "nope")], "no checkpoint there"),
                       ([tiny_reward], "'reward' checkpoint"),
                       ([tiny_sft, "--reward-model", tiny_sft], "'sft' checkpoint"),
                       ([tiny_sft, "--port", "70000"], "--port 70000: expected 0 to 65535")]:
        with pytest.raises(SystemExit) as e:
            serve.main(args)
        err = capsys.readouterr().err
        assert e.value.code == 2 and says in err and len(err.strip().splitlines()) == 1, err


def test_a_port_in_use_is_named(server):
    with pytest.raises(serve.UserError, match=f"--port {server.server_address[1]} is in use"):
        serve.make_server(server.models, server.server_address[1])


def test_every_instruct_stage_is_a_column(tiny_sft, tmp_path):
    """DPO's and GRPO's checkpoints are chat models as SFT's and PPO's are."""
    import shutil
    from checkpoints import load_checkpoint, save_checkpoint
    model, tok, _ = load_checkpoint(tiny_sft, ["sft"])
    folders = []
    for stage in ("dpo", "grpo"):
        folder = tmp_path / stage
        folder.mkdir()
        save_checkpoint(str(folder), stage, model, tok)
        shutil.copy(f"{tiny_sft}/tokenizer.json", folder)
        folders.append(str(folder))
    models = serve.Models(folders, device="cpu")
    assert [c["stage"] for c in models.columns] == ["dpo", "grpo"]
