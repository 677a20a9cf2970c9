"""The paths a GPU run takes, run on this CPU: bf16 autocast, fp16 with its GradScaler,
torch.compile (and its fail-soft fallback), and resuming a checkpoint saved on a CUDA device.
What stays CUDA-only (NCCL, TF32, the MFU peak table) is README's GPU checklist."""
import json

import pytest
import torch

import pretrain
from tests.test_pretrain import FAST, losses


def mean(curve, steps):
    return sum(curve[s] for s in steps) / len(steps)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_precision_autocast_trains_on_the_cpu(dtype, small_data, tmp_path):
    out = tmp_path / dtype
    pretrain.main(FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "60",
                          "--dtype", dtype])
    curve = losses(out)
    assert mean(curve, range(51, 61)) < curve[1] - 1.0, curve
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    assert all(w.dtype == torch.float32 for w in ckpt["model"].values())  # fp32 master weights
    if dtype == "float16":  # the loss scale is part of the training state
        assert ckpt["scaler"]["scale"] > 0
    else:
        assert ckpt["scaler"] == {}


def test_compile_trains_the_same_curve(small_data, tmp_path, capsys):
    args = FAST + ["--data", small_data, "--steps", "4"]
    pretrain.main(args + ["--out-dir", str(tmp_path / "eager")])
    pretrain.main(args + ["--out-dir", str(tmp_path / "compiled"), "--compile"])
    assert "torch.compile failed" not in capsys.readouterr().err  # it really compiled
    eager, compiled = losses(tmp_path / "eager"), losses(tmp_path / "compiled")
    assert compiled == pytest.approx(eager, rel=1e-3)


def test_compile_that_fails_falls_back_to_eager(small_data, tmp_path, monkeypatch, capsys):
    def broken(model, **kw):
        raise RuntimeError("no C++ compiler here")
    monkeypatch.setattr(torch, "compile", broken)
    args = FAST + ["--data", small_data, "--steps", "3"]
    pretrain.main(args + ["--out-dir", str(tmp_path / "a"), "--compile"])
    assert "warning: torch.compile failed (RuntimeError: no C++ compiler here)" in \
        capsys.readouterr().err
    pretrain.main(args + ["--out-dir", str(tmp_path / "b")])
    assert losses(tmp_path / "a") == losses(tmp_path / "b")


def test_a_checkpoint_saved_on_a_gpu_resumes_on_the_cpu(small_data, tmp_path, monkeypatch):
    """torch.save records each tensor's device; a checkpoint written on cuda:0 names cuda:0. Such
    a file is made here by relabelling a CPU checkpoint the way torch.save labels GPU tensors."""
    args = FAST + ["--data", small_data, "--steps", "8", "--eval-every", "4"]
    pretrain.main(args + ["--out-dir", str(tmp_path / "straight")])
    out = tmp_path / "moved"
    pretrain.main(args + ["--out-dir", str(out), "--stop-at", "4"])
    ckpt = torch.load(out / "ckpt.pt", weights_only=True)
    with monkeypatch.context() as m:
        m.setattr(torch.serialization, "location_tag", lambda storage: "cuda:0")
        torch.save(ckpt, out / "ckpt.pt")
    if not torch.cuda.is_available():  # the file really names a GPU
        with pytest.raises(RuntimeError, match="CUDA"):
            torch.load(out / "ckpt.pt", weights_only=True)
    pretrain.main(args + ["--out-dir", str(out), "--resume"])
    straight, resumed = losses(tmp_path / "straight"), losses(out)
    assert sorted(resumed) == list(range(1, 9))
    for step in range(5, 9):
        assert resumed[step] == pytest.approx(straight[step], rel=1e-5), step
    assert json.loads((out / "eval.json").read_text())["steps"] == 8


def test_a_run_without_fp16_resumes_with_it(small_data, tmp_path):
    """A bf16 or fp32 checkpoint has no loss scale: resumed in fp16 (a CPU run continued on an
    older GPU, say), the GradScaler starts afresh."""
    out = tmp_path / "base"
    args = FAST + ["--data", small_data, "--out-dir", str(out), "--steps", "6"]
    pretrain.main(args + ["--stop-at", "3"])
    assert torch.load(out / "ckpt.pt", weights_only=True)["scaler"] == {}
    pretrain.main(args + ["--resume", "--dtype", "float16"])
    assert sorted(losses(out)) == [1, 2, 3, 4, 5, 6]
    assert torch.load(out / "ckpt.pt", weights_only=True)["scaler"]["scale"] > 0
