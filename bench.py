"""Speed benchmarks, written as one JSON object (speed targets live here, never in tests).

    python bench.py                               # everything that applies to this machine
    python bench.py --only generate --out bench.json
    python bench.py --preset gpu --compile        # on a GPU: adds MFU and a GPT-2-small run

- tokenizer: BPE training time for vocab 4096 on the full bundled corpus, and bytes per token
- train: pretraining tokens/s (and MFU on a GPU) for the preset's model and batch shape
- generate: sampling tokens/s with the KV cache against recomputing the whole sequence each
  step, same model, same left-padded batch of prompts, 256 new tokens
- reward: answers sampled per second (K = 3 per prompt, batched, KV cache) and comparisons
  (a prompt, its K answers, all their pairs) trained per second, as in reward.py
- gpt2: (GPU only) a GPT-2-small-sized model, about 124M parameters, context 1024
Model weights are random: speed does not depend on them.
"""
import argparse
import json
import os
import platform
import sys
import time

import torch

from cli import preset_for
from ground import UserError, die, positive, stop_reason, writable_dir
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
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=device.startswith("cuda"))
    x = torch.randint(cfg.vocab_size, (micro_batch, cfg.block_size + 1), device=device)
    run = maybe_compile(model, compile_, x[:, :-1])

    def step():
        with autocast(device, dtype):
            _, loss = run(x[:, :-1], x[:, 1:])
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

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


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=["auto", *SHAPES], default="auto",
                   help="the model and micro-batch of this pretrain.py preset (auto: gpu on a "
                        "CUDA device, else cpu)")
    p.add_argument("--only", choices=["tokenizer", "train", "generate", "reward", "gpt2"],
                   action="append",
                   help="run only these parts (repeatable)")
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
    except UserError as e:
        die(str(e))
    try:
        run_benchmarks(args, device, dtype)
    except (KeyboardInterrupt, OSError) as e:  # Ctrl-C, or writing --out on a full disk
        sys.exit(f"stopped: {stop_reason(e)}")


def run_benchmarks(args, device, dtype):
    preset = args.preset if args.preset != "auto" else preset_for(device)
    shape = dict(SHAPES[preset])
    micro_batch = shape.pop("micro_batch")
    cfg = GPTConfig(vocab_size=4096, **shape)
    parts = args.only or ["tokenizer", "train", "generate", "reward"] + (
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
        elif part == "reward":
            result[part] = bench_reward(cfg, device, dtype)
        elif part == "generate":
            result[part] = bench_generate(cfg, device, dtype)
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
