"""The page of serve.py, checked the way a person uses it, in a real headless Chromium.

    python tests/browser_check.py out/base out/sft out/ppo --reward-model out/reward \\
        --prompt "What is the capital of France?" --out docs/serve.png

It starts serve.py on a free port and Chromium with its DevTools protocol open, loads the page,
types the prompt into the prompt box (key events, as a keyboard would), clicks Generate with the
mouse, waits until every column has finished, clicks the first generated token of the second
column, waits for the next-token table, and saves a screenshot of the whole page. It prints what
the page shows (each column's answer and verdict line) and exits 1 if a step fails.

Needs Chromium (Debian: apt-get install chromium) and websocket-client (requirements-dev.txt).
Not part of ./test.sh: the endpoints are tested there (tests/test_serve.py); this checks the page.
"""
import argparse
import base64
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request

try:
    import websocket  # websocket-client
except ImportError:  # said in one line by main()
    websocket = None

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def wait_for(what, check, timeout):
    """Poll check() until it returns something true; fail naming `what` after `timeout` s."""
    end = time.time() + timeout
    while time.time() < end:
        value = check()
        if value:
            return value
        time.sleep(0.2)
    sys.exit(f"browser check: timed out waiting for {what}")


class DevTools:
    """A minimal Chrome DevTools Protocol client over one page's WebSocket."""

    def __init__(self, ws_url):
        self.ws = websocket.create_connection(ws_url, timeout=60, suppress_origin=True)
        self.next_id = 0

    def call(self, method, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # skip the events the page sends meanwhile
            reply = json.loads(self.ws.recv())
            if reply.get("id") == self.next_id:
                if "error" in reply:
                    sys.exit(f"browser check: {method}: {reply['error']}")
                return reply["result"]

    def js(self, expression):
        result = self.call("Runtime.evaluate", expression=expression, returnByValue=True)
        return result["result"].get("value")

    def click(self, selector):
        """A real mouse click (press and release) at the centre of the element."""
        box = self.js(f"(() => {{ const r = document.querySelector({json.dumps(selector)})"
                      ".getBoundingClientRect(); "
                      "return [r.x + r.width / 2, r.y + r.height / 2]; })()")
        for kind in ("mousePressed", "mouseReleased"):
            self.call("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left",
                      clickCount=1)

    def type(self, text):
        for ch in text:  # one key event per character, as typing sends them
            self.call("Input.dispatchKeyEvent", type="keyDown", text=ch, key=ch)
            self.call("Input.dispatchKeyEvent", type="keyUp", key=ch)


def start_chromium(profile):
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or \
        shutil.which("google-chrome")
    if not chromium:
        sys.exit("browser check: no Chromium found (Debian: apt-get install chromium)")
    proc = subprocess.Popen([chromium, "--headless=new", "--no-sandbox", "--disable-gpu",
                             "--remote-debugging-port=0", f"--user-data-dir={profile}",
                             "--window-size=1400,900", "about:blank"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port_file = os.path.join(profile, "DevToolsActivePort")
        port = wait_for("Chromium's DevTools port", lambda: os.path.exists(port_file) and
                        open(port_file).read().split("\n")[0], 30)
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as r:
            page = next(t for t in json.load(r) if t["type"] == "page")
        return proc, DevTools(page["webSocketDebuggerUrl"])
    except BaseException:  # no browser left behind when the connection fails
        proc.terminate()
        proc.wait(timeout=30)
        raise


def check_page(tools, url, args):
    tools.call("Page.navigate", url=url)
    wait_for("the page to load the models", lambda: tools.js("document.body.dataset.state") ==
             "ready", 60)
    if args.system:
        tools.click("#system")
        tools.type(args.system)
    tools.click("#prompt")
    tools.type(args.prompt)
    tools.click("#generate")
    n = len(args.ckpts)
    state = wait_for("every column to finish", lambda: tools.js(
        "document.body.dataset.state !== 'running' && document.querySelectorAll('.column.done')"
        f".length === {n} ? document.body.dataset.state : (document.body.dataset.state === "
        "'error' ? 'error' : '')"), args.timeout)
    if state != "done":
        error = tools.js("document.getElementById('error').textContent")
        sys.exit(f"browser check: the page says {error}")
    column = min(1, n - 1)
    tools.click(f".column:nth-child({column + 1}) .token")
    wait_for("the next-token table", lambda: tools.js(
        f"!document.getElementById('next').hidden && document.querySelectorAll('#next table')"
        f".length === {n}"), 60)
    return tools.js("""JSON.stringify({
        teacher: document.getElementById('teacher').textContent,
        columns: [...document.querySelectorAll('.column')].map(c => ({
            title: c.querySelector('h2').textContent,
            answer: c.querySelector('.answer').textContent,
            meta: c.querySelector('.meta').textContent})),
        next: document.getElementById('next-title').textContent,
        top: [...document.querySelectorAll('#next-columns > div')].map(d => d.querySelector('b')
            .textContent + ': ' + [...d.querySelectorAll('tr')].slice(0, 3).map(r =>
            r.cells[0].textContent + ' ' + r.cells[2].textContent).join(', '))})""")


def screenshot(tools, path):
    height = tools.js("document.documentElement.scrollHeight")
    tools.call("Emulation.setDeviceMetricsOverride", width=1400, height=height,
               deviceScaleFactor=1, mobile=False)
    png = tools.call("Page.captureScreenshot", format="png")["data"]
    with open(path, "wb") as f:
        f.write(base64.b64decode(png))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ckpts", nargs="+", metavar="DIR")
    p.add_argument("--reward-model", metavar="DIR")
    p.add_argument("--prompt", default="What is the capital of France?")
    p.add_argument("--system", default="")
    p.add_argument("--out", default="serve.png", help="the screenshot (PNG)")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait for the answers")
    args = p.parse_args(argv)
    if websocket is None:
        sys.exit("browser check: needs websocket-client (pip install -r requirements-dev.txt)")
    scorer = ["--reward-model", args.reward_model] if args.reward_model else []
    server = subprocess.Popen([sys.executable, os.path.join(ROOT, "serve.py"), *args.ckpts,
                               "--port", "0", "--device", "cpu", *scorer],
                              stdout=subprocess.PIPE, text=True)
    profile = tempfile.mkdtemp(prefix="browser-check-")
    browser = None
    try:
        line = server.stdout.readline()  # "serving ... on http://127.0.0.1:PORT (Ctrl-C stops)"
        if " on http://" not in line:
            sys.exit("browser check: serve.py did not start (its error is above)")
        url = line.split(" on ")[-1].split()[0] + "/"
        browser, tools = start_chromium(profile)
        shown = json.loads(check_page(tools, url, args))
        screenshot(tools, args.out)
        print(json.dumps(shown, indent=1))
        print(f"browser check passed: {args.out}")
    finally:
        for proc in (browser, server):
            if proc:
                proc.terminate()
                proc.wait(timeout=30)
        shutil.rmtree(profile, ignore_errors=True)


if __name__ == "__main__":
    main()
