"""Speed benchmarks, written as one JSON object (speed targets live here, never in tests).

    python bench.py                               # everything that applies to this machine
    python bench.py --only generate --out bench.json
    python bench.py --preset gpu --compile        # on a GPU: adds MFU and a GPT-2-small run

- tokenizer: BPE training time for vocab 4096 on the full bundled corpus, and bytes per token
- train: pretraining tokens/s (and MFU on a GPU) for the preset's model and batch shape
- nanogpt: the same training step side by side with a reference GPT written the plain nanoGPT
  way (LayerNorm, learned positions, one q/k/v projection, a GELU MLP, tied embeddings) of the
  same width, depth and FLOPs per token, the two timed in turn in one process
- generate: sampling tokens/s with the KV cache against recomputing the whole sequence each
  step, same model, same left-padded batch of prompts, 256 new tokens
- reward: answers sampled per second (K = 3 per prompt, batched, KV cache) and comparisons
  (a prompt, its K answers, all their pairs) trained per second, as in reward.py
- gpt2: (GPU only) a GPT-2-small-sized model, about 124M parameters, context 1024
- quality (only when named): time to quality, the seconds of pretraining until the validation
  loss and the few-shot accuracy reach fixed targets, so a change that trades quality for
  speed shows (a whole pretraining run of the preset, on the bundled world)
Model weights are random: speed does not depend on them.
"""
import argparse
import json
import os
import platform
import shlex
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

from cli import preset_for
from ground import (UserError, die, jsonl_rows, positive, sigterm_stops, stop_reason,
                    writable_dir)
from model import GPT, GPTConfig, ScalarHeadGPT
from training import autocast, maybe_compile, peak_flops, pick_device, pick_dtype

# The model and micro-batch of pretrain.py's presets of the same names (a stage script is never
# imported; tests/test_structure.py checks that they still match).
SHAPES = {
    "tiny": dict(n_layer=2, n_head=2, n_kv_head=2, n_embd=64, block_size=128, micro_batch=16),
    "cpu": dict(n_layer=4, n_head=4, n_kv_head=4, n_embd=256, block_size=128, micro_batch=16),
    "gpu": dict(n_layer=8, n_head=8, n_kv_head=8, n_embd=512, block_size=512, micro_batch=64),
}


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def sync(device):
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_tokenizer():
    from data import world
    from data.tokenizer import Tokenizer
    docs = world.world_documents() + world.shakespeare_documents()
    t0 = time.time()
    tok = Tokenizer.train(docs, 4096)
    seconds = time.time() - t0
    n_bytes = sum(len(d.encode()) for d in docs)
    n_tokens = sum(map(len, tok.encode_batch(docs)))
    return dict(vocab_size=tok.n_vocab, corpus_mb=round(n_bytes / 1e6, 2),
                train_seconds=round(seconds, 2), bytes_per_token=round(n_bytes / n_tokens, 3))


def bench_train(cfg, micro_batch, device, dtype, compile_, steps):
    model = GPT(cfg).to(device)
    x = torch.randint(cfg.vocab_size, (micro_batch, cfg.block_size + 1), device=device)
    step = training_step(maybe_compile(model, compile_, x[:, :-1]), x, device, dtype)
    for _ in range(3):  # warm-up (compilation, allocator, caches)
        step()
    sync(device)
    t0 = time.time()
    for _ in range(steps):
        step()
    sync(device)
    dt = (time.time() - t0) / steps
    tps = micro_batch * cfg.block_size / dt
    out = dict(params_m=round(model.num_params(False) / 1e6, 2), micro_batch=micro_batch,
               block_size=cfg.block_size, tokens_per_s=round(tps))
    peak = peak_flops(device)
    if peak:
        out["mfu"] = round(model.flops_per_token() * tps / peak, 4)
    return out


class ReferenceBlock(nn.Module):
    """nanoGPT's block (Karpathy, 2022): pre-LayerNorm, one projection to queries, keys and
    values, causal attention, a GELU MLP. No biases, as the project's model."""

    def __init__(self, n_embd, n_head, mlp_hidden):
        super().__init__()
        self.n_head = n_head
        self.ln_1 = nn.LayerNorm(n_embd, bias=False)
        self.c_attn = nn.Linear(n_embd, 3 * n_embd, bias=False)
        self.attn_proj = nn.Linear(n_embd, n_embd, bias=False)
        self.ln_2 = nn.LayerNorm(n_embd, bias=False)
        self.c_fc = nn.Linear(n_embd, mlp_hidden, bias=False)
        self.mlp_proj = nn.Linear(mlp_hidden, n_embd, bias=False)

    def forward(self, x):
        B, T, C = x.shape
        q, k, v = self.c_attn(self.ln_1(x)).split(C, dim=2)
        q, k, v = (t.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for t in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn_proj(y.transpose(1, 2).reshape(B, T, C))
        return x + self.mlp_proj(F.gelu(self.c_fc(self.ln_2(x))))


class ReferenceGPT(nn.Module):
    """A GPT written the plain nanoGPT way, as wide, deep and long as `cfg`, at the same FLOPs
    per token as GPT(cfg) (without grouped-query attention, as in every preset): its MLP's two
    matrices hold as many weights as SwiGLU's three."""

    def __init__(self, cfg):
        super().__init__()
        self.wte = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.wpe = nn.Embedding(cfg.block_size, cfg.n_embd)
        self.blocks = nn.ModuleList(ReferenceBlock(cfg.n_embd, cfg.n_head, 3 * cfg.ffn_hidden // 2)
                                    for _ in range(cfg.n_layer))
        self.ln_f = nn.LayerNorm(cfg.n_embd, bias=False)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.wte.weight  # tied, as nanoGPT's
        self.config = cfg

    def flops_per_token(self):
        """As GPT.flops_per_token: 6 per weight that multiplies (not the positions' table)."""
        c = self.config
        weights = sum(p.numel() for p in self.parameters()) - self.wpe.weight.numel()
        return 6 * weights + 12 * c.n_layer * c.n_embd * c.block_size

    def forward(self, idx, targets=None):
        x = self.wte(idx) + self.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in self.blocks:
            x = block(x)
        logits = self.lm_head(self.ln_f(x))
        if targets is None:
            return logits, None
        return logits, F.cross_entropy(logits.float().flatten(0, 1), targets.flatten())


def bench_against_nanogpt(cfg, micro_batch, device, dtype, compile_, steps, rounds=5):
    """Training steps of GPT(cfg) and ReferenceGPT(cfg), the same batch and optimizer, both
    compiled or neither, timed in turn (`steps` of one, then `steps` of the other, `rounds`
    times) so that a machine that slows down slows both: the median seconds a step of each, and
    the ratio of tokens/s."""
    torch.manual_seed(0)
    models = {"project": GPT(cfg).to(device), "nanogpt": ReferenceGPT(cfg).to(device)}
    x = torch.randint(cfg.vocab_size, (micro_batch, cfg.block_size + 1), device=device)
    steppers = {name: training_step(maybe_compile(model, compile_, x[:, :-1]), x,
                                    device, dtype) for name, model in models.items()}
    for step in steppers.values():  # warm-up
        step()
    seconds = {name: [] for name in models}
    for _ in range(rounds):
        for name, step in steppers.items():
            sync(device)
            t0 = time.time()
            for _ in range(steps):
                step()
            sync(device)
            seconds[name].append((time.time() - t0) / steps)
    out = {"micro_batch": micro_batch, "block_size": cfg.block_size}
    for name, model in models.items():
        median = sorted(seconds[name])[rounds // 2]
        out[name] = {"seconds_per_step": round(median, 4),
                     "flops_per_token": model.flops_per_token(),
                     "tokens_per_s": round(micro_batch * cfg.block_size / median)}
    out["speed_ratio"] = round(out["project"]["tokens_per_s"] / out["nanogpt"]["tokens_per_s"],
                               3)
    return out


def training_step(model, x, device, dtype):
    """One AdamW training step on batch x (inputs x[:, :-1], targets x[:, 1:]), as a function."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))

    def step():
        with autocast(device, dtype):
            _, loss = model(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


@torch.no_grad()
def bench_generate(cfg, device, dtype, batch=8, new_tokens=256):
    cfg = GPTConfig(**{**vars(cfg), "block_size": max(cfg.block_size, 32 + new_tokens)})
    model = GPT(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    prompts = [torch.randint(cfg.vocab_size, (int(n),), generator=g).tolist()
               for n in torch.randint(8, 33, (batch,), generator=g)]
    out = {"batch": batch, "new_tokens": new_tokens}
    for name, cache in (("kv_cache", True), ("no_cache", False)):
        with autocast(device, dtype):
            model.generate(prompts, 8, temperature=0, use_cache=cache)  # warm-up
            sync(device)
            t0 = time.time()
            rows = model.generate(prompts, new_tokens, temperature=0, use_cache=cache)
            sync(device)
        out[f"{name}_tokens_per_s"] = round(sum(map(len, rows)) / (time.time() - t0), 1)
    out["speedup"] = round(out["kv_cache_tokens_per_s"] / out["no_cache_tokens_per_s"], 2)
    return out


def bench_reward(cfg, device, dtype, prompts=32, k=3, prompt_len=24, answer_len=24, steps=5):
    """The reward stage's two loops at the preset's size: answers sampled per second (K per
    prompt, one batched KV-cached call, random weights so every answer runs to answer_len), and
    comparisons (prompts with their K answers and all C(K,2) pairs) trained per second."""
    policy = GPT(cfg).to(device).eval()
    g = torch.Generator().manual_seed(0)
    batch = [torch.randint(cfg.vocab_size, (prompt_len,), generator=g).tolist()] * (prompts * k)
    with autocast(device, dtype):
        policy.generate(batch[:8], 4, temperature=1.0, seed=0)  # warm-up
        sync(device)
        t0 = time.time()
        policy.generate(batch, answer_len, temperature=1.0, seed=0)
        sync(device)
    out = {"answers_per_s": round(prompts * k / (time.time() - t0), 1)}
    model = ScalarHeadGPT(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5)
    ids = torch.randint(cfg.vocab_size, (prompts * k, prompt_len + answer_len), device=device)
    pairs = [(a, b) for a in range(k) for b in range(a + 1, k)]
    better = torch.tensor([p * k + a for p in range(prompts) for a, _ in pairs], device=device)
    worse = torch.tensor([p * k + b for p in range(prompts) for _, b in pairs], device=device)
    for step in range(steps + 2):  # 2 warm-up steps
        if step == 2:
            sync(device)
            t0 = time.time()
        with autocast(device, dtype):
            last = model(ids)[:, -1]
            loss = -torch.nn.functional.logsigmoid(last[better] - last[worse]).mean()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    sync(device)
    out["comparisons_per_s"] = round(prompts * steps / (time.time() - t0), 1)
    return out


# Time to quality: a little short of where the cpu preset's run ends (validation loss 2.27,
# few-shot 93% / 97%), so that a faster run that learns less never gets there and shows it.
QUALITY_TARGETS = {"val_loss": 2.35, "fewshot": 0.85}


def bench_quality(preset, device, every, pretrain_args):
    """pretrain.py's own run of the preset, in pieces of `every` steps (--stop-at, then
    --resume: the schedule spans the whole run); after each piece the validation loss and the
    few-shot accuracy (the mean of capital and symbol) of its checkpoint. Reports the seconds of
    training (the logged steps' own times: evaluation and restarts left out) until each first
    reaches QUALITY_TARGETS (None: never), and the curve."""
    import subprocess
    import tempfile

    from checkpoints import load_checkpoint
    from evaluation import evaluate_base
    out = {"targets": QUALITY_TARGETS, "pretrain_args": pretrain_args, "curve": []}
    with tempfile.TemporaryDirectory() as run_dir:
        step, steps = 0, None
        while steps is None or step < steps:
            step += every
            command = [sys.executable, os.path.join(os.path.dirname(__file__), "pretrain.py"),
                       "--preset", preset, "--device", device,
                       "--out-dir", run_dir, "--stop-at", str(step), "--no-behaviour-eval",
                       "--eval-every", str(every), *pretrain_args]
            piece = subprocess.run(command + ["--resume"] * (step > every), text=True,
                                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            if piece.returncode:  # pretrain.py's own last line says why
                lines = piece.stderr.strip().splitlines() or ["no message"]
                raise UserError(f"quality: pretrain.py (the piece up to step {step}) stopped: "
                                f"{lines[-1]}")
            model, tok, ckpt = load_checkpoint(run_dir, ["base"], device)
            steps, step = ckpt["config"]["steps"], ckpt["step"]
            log = [row for _, row in jsonl_rows(os.path.join(run_dir, "log.jsonl"))]
            scores = evaluate_base(model, tok, device, n_zero_shot=0)
            del model  # the next piece's process needs the memory
            tokens = ckpt["config"]["batch_size"] * ckpt["config"]["block_size"]  # a step's
            out["curve"].append({
                "step": step, "train_seconds": round(sum(
                    tokens / row["tok_per_s"] for row in log), 1),
                "val_loss": ckpt["val_loss"], "fewshot": round(
                    (scores["fewshot_capital_accuracy"] + scores["fewshot_symbol_accuracy"]) / 2,
                    3)})
    for key, reached in (("val_loss", lambda row: row["val_loss"] <= QUALITY_TARGETS["val_loss"]),
                         ("fewshot", lambda row: row["fewshot"] >= QUALITY_TARGETS["fewshot"])):
        first = next((row for row in out["curve"] if reached(row)), None)
        out[f"seconds_to_{key}"] = first and first["train_seconds"]
    return out


@sigterm_stops()  # SIGTERM stops it as Ctrl-C does
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *SHAPES], default="auto",
                   help="the model and micro-batch of this pretrain.py preset (auto: gpu on a "
                        "CUDA device, else cpu)")
    p.add_argument("--only", choices=["tokenizer", "train", "nanogpt", "generate", "reward",
                                      "gpt2", "quality"],
                   action="append",
                   help="run only these parts (repeatable); quality (time to quality: a whole "
                        "pretraining run, as long as the stage; its targets are the cpu "
                        "preset's) runs only when named")
    p.add_argument("--quality-every", type=positive(int), default=100,
                   help="quality: steps between two measurements")
    p.add_argument("--pretrain-args", default="",
                   help="quality: more pretrain.py flags, in quotes (\"--optimizer muon\")")
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--compile", action="store_true")
    p.add_argument("--steps", type=positive(int), default=10, help="timed training steps")
    p.add_argument("--out", help="also write the JSON here")
    args = p.parse_args(argv)
    try:  # mistakes are one line, before the benchmarks, never a traceback after them
        device = pick_device(args.device)
        dtype = pick_dtype(args.dtype, device)
        if args.out and os.path.isdir(args.out):
            raise UserError(f"--out {args.out}: a folder; name the JSON file to write")
        if args.out:
            writable_dir(os.path.dirname(os.path.abspath(args.out)), "--out")
        try:  # the quality part's pretraining runs as bench itself does
            args.pretrain_args = shlex.split(args.pretrain_args) + ["--dtype", args.dtype] + [
                "--compile"] * args.compile
        except ValueError as e:
            raise UserError(f"--pretrain-args: {e}") from None
    except UserError as e:
        die(str(e))
    try:
        run_benchmarks(args, device, dtype)
    except UserError as e:  # a quality piece that stopped
        die(str(e))
    except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, or writing --out on a full disk
        sys.exit(f"stopped: {stop_reason(e)}")


def run_benchmarks(args, device, dtype):
    preset = args.preset if args.preset != "auto" else preset_for(device)
    shape = dict(SHAPES[preset])
    micro_batch = shape.pop("micro_batch")
    cfg = GPTConfig(vocab_size=4096, **shape)
    parts = args.only or ["tokenizer", "train", "nanogpt", "generate", "reward"] + (
        ["gpt2"] if device == "cuda" else [])
    result = dict(date=time.strftime("%Y-%m-%d"), device=device, dtype=str(dtype).split(".")[-1],
                  device_name=(torch.cuda.get_device_name() if device.startswith("cuda")
                               else cpu_name()),
                  cpu_count=os.cpu_count(), torch=torch.__version__, preset=preset,
                  compile=args.compile)
    for part in parts:
        print(f"bench: {part} ...", file=sys.stderr)
        if part == "tokenizer":
            result[part] = bench_tokenizer()
        elif part == "train":
            result[part] = bench_train(cfg, micro_batch, device, dtype, args.compile, args.steps)
        elif part == "nanogpt":
            result[part] = bench_against_nanogpt(cfg, micro_batch, device, dtype, args.compile,
                                                 args.steps)
        elif part == "reward":
            result[part] = bench_reward(cfg, device, dtype)
        elif part == "generate":
            result[part] = bench_generate(cfg, device, dtype)
        elif part == "quality":
            result[part] = bench_quality(preset, device, args.quality_every, args.pretrain_args)
        elif part == "gpt2":
            gpt2 = GPTConfig(vocab_size=50304, block_size=1024, n_layer=12, n_head=12,
                             n_kv_head=12, n_embd=768, ffn_hidden=2048)
            result[part] = bench_train(gpt2, 16, device, dtype, args.compile, args.steps)
    text = json.dumps(result, indent=2)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
