"""The ground every other module stands on, without torch: one-line errors, the types of
command-line flags, and files written whole or not at all.

- UserError: bad input from the user; every command prints it as one line and exits with 2;
  stop_reason: what stopped a command (Ctrl-C, SIGTERM, a failed write), in a few words;
  sigterm_stops: SIGTERM stops a command as Ctrl-C does.
- finite, between, positive, nonnegative, choice, seed_arg: argparse types whose errors say
  what was wrong.
- run_lock: one run at a time writes to a folder.
- writable_dir, atomic_write, write_text, write_json: a file is written to a temporary name, made
  durable (fsync) and renamed over the old one, so that a crash, Ctrl-C or a full disk never
  leaves half a file behind.
- jsonl_rows: the rows of a JSONL file, each error naming its file and line.

data/ and plot.py import only this of the plumbing, so they load without torch.
"""
import argparse
import contextlib
import fcntl
import json
import math
import os
import signal
import sys
import tempfile


class UserError(Exception):
    """Bad input from the user: scripts print it as one line and exit with status 2."""


def die(msg):
    print(f"error: {msg}", file=sys.stderr)
    sys.exit(2)


def run_or_die(run, args):
    """run(args), where a UserError ends the command with its one line (the experiments)."""
    try:
        with sigterm_stops():
            run(args)
    except UserError as e:
        die(str(e))
    except KeyboardInterrupt as e:  # each finished stage is kept: the same command goes on
        sys.exit(f"stopped: {stop_reason(e)}")


class Terminated(KeyboardInterrupt):
    """SIGTERM (`kill`, a scheduler's time limit): it stops a command as Ctrl-C does."""


@contextlib.contextmanager
def sigterm_stops():
    """Within it, SIGTERM raises Terminated, so a command stops as after Ctrl-C (saying in one
    line what is on disk) instead of vanishing without a word."""
    def terminate(signum, frame):
        raise Terminated()
    try:
        previous, installed = signal.signal(signal.SIGTERM, terminate), True
    except ValueError:  # not the main thread: signals stay as they are
        installed = False
    try:
        yield
    finally:
        if installed:
            signal.signal(signal.SIGTERM, previous)


def stop_reason(e):
    """Ctrl-C, SIGTERM, a failed write (naming the file) or a non-finite loss, in a few words."""
    if isinstance(e, Terminated):
        return "terminated (SIGTERM)"
    if isinstance(e, KeyboardInterrupt):
        return "interrupted"
    if isinstance(e, OSError):
        return f"{e.filename}: {e.strerror}" if e.filename else (e.strerror or str(e))
    return str(e)


def finite(text):
    """argparse type: a float that is a number (not nan, not inf), of either sign."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def between(low, high):
    """argparse type: a float from low to high, both included."""
    def parse(text):
        value = float(text)
        if not low <= value <= high:  # nan fails every comparison
            raise argparse.ArgumentTypeError(f"must lie in {low} .. {high}, got {text}")
        return value
    return parse


def positive(kind):
    """argparse type: a finite number > 0."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value <= 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
    return parse


def nonnegative(kind):
    """argparse type: a finite number >= 0."""
    def parse(text):
        value = kind(text)
        if not math.isfinite(value) or value < 0:
            raise argparse.ArgumentTypeError(f"must be 0 or more, got {text}")
        return value
    return parse


def choice(*options):
    """argparse type: one of the options."""
    def parse(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"must be one of {', '.join(options)}, got {text}")
        return text
    return parse


def seed_arg(text):
    """argparse type: a seed torch accepts, with room for the offsets the stages add to it."""
    value = int(text)
    if not 0 <= value < 2**32:
        raise argparse.ArgumentTypeError(f"must lie in 0 .. 2**32 - 1, got {text}")
    return value


def writable_dir(path, flag):
    """Create folder `path` if needed and prove that a file can be written in it, so that an
    unusable output path is a one-line error naming its flag before any work, never a traceback
    after it."""
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserError(f"{flag} {path}: is a file, not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise UserError(f"{flag} {path}: cannot write there ({e.strerror or e})") from None


LOCK_FILE = "run.lock"


@contextlib.contextmanager
def run_lock(folder, flag):
    """Within it, this process alone writes to `folder`: a second run into the same folder stops
    with one line instead of interleaving its log and racing for the checkpoint. The kernel
    holds the lock (flock) and frees it when its process ends, however it ends, so a lock file
    that a killed run left behind is simply taken; the file names the holder's process id, and
    is removed on the way out."""
    path = os.path.join(folder, LOCK_FILE)
    while True:
        fd = os.open(path, os.O_CREAT | os.O_RDWR)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise UserError(f"{flag} {folder}: another run (process {holder}) is writing there; "
                            f"wait for it, or choose another {flag}") from None
        try:  # the file may have been removed by its last holder between our open and flock
            if os.stat(path).st_ino == os.fstat(fd).st_ino:
                break
        except FileNotFoundError:
            pass
        os.close(fd)  # a lock on a removed file protects nothing: try again
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    try:
        yield
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)  # while still held, so that no one locks the file being removed
        os.close(fd)


def atomic_write(path, write):
    """write(tmp_path), then rename over `path`: readers see the old file or the new, never half.
    A failed write (disk full, say) leaves the old file as it was and raises the OSError, named
    after `path`; Ctrl-C during the write raises KeyboardInterrupt (torch.save turns both into a
    RuntimeError)."""
    tmp = f"{path}.tmp{os.getpid()}"
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())  # on disk before the rename, or a power cut could leave nothing
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        cause = e if isinstance(e, OSError) else e.__context__
        if isinstance(cause, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (Terminated)
            raise type(cause)() from e
        if not isinstance(cause, OSError):
            raise
        raise OSError(cause.errno, cause.strerror or str(cause), path) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text(path, text):
    def write(tmp):
        with open(tmp, "w") as f:
            f.write(text)
    atomic_write(path, write)


def write_json(path, obj):
    write_text(path, json.dumps(obj, indent=2) + "\n")


def jsonl_rows(path):
    """(where, object) for each non-empty line of a JSONL file, where = "path:line"; a file that
    cannot be read, a line that is not UTF-8 or not JSON: a UserError naming it."""
    try:
        with open(path, "rb") as f:
            lines = f.readlines()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    for n, raw in enumerate(lines, 1):
        where = f"{path}:{n}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{where}: not UTF-8 text") from None
        if not line.strip():
            continue
        yield where, parse_json(line, where)


def parse_json(text, where):
    """json.loads, with a UserError naming `where` for text that is not JSON, or nested so deep
    (`[[[[...`) that Python's parser runs out of stack."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{where}: not valid JSON ({e.msg})") from None
    except RecursionError:
        raise UserError(f"{where}: JSON nested too deeply to read") from None


def read_json(path):
    """The JSON object of a whole file, read strictly: a file that cannot be read, is not UTF-8,
    not JSON or not an object is a UserError naming it."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise UserError(f"{path}: cannot read it ({e.strerror or e})") from None
    try:
        value = parse_json(raw.decode("utf-8"), path)
    except UnicodeDecodeError:
        raise UserError(f"{path}: not UTF-8 text") from None
    if not isinstance(value, dict):
        raise UserError(f"{path}: expected a JSON object ({{...}})")
    return value
