"""Shared fixtures: a small prepared corpus (a slice of the bundled world), and tiny base, SFT and
reward models trained on it in seconds; and a helper that runs a training script under a real
torchrun."""
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="session")
def small_data(tmp_path_factory):
    """A prepared token folder from ~300 KB of world documents and Shakespeare, vocab 512."""
    from data import prepare, world
    src = tmp_path_factory.mktemp("corpus")
    docs = world.world_documents(seed=0)[:400] + [world.shakespeare_documents()[0][:100_000]]
    for i, d in enumerate(docs):
        (src / f"{i:04d}.txt").write_text(d, encoding="utf-8")
    out = tmp_path_factory.mktemp("data")
    prepare.prepare(str(out), inputs=[str(src)], vocab_size=512, val_fraction=0.1, quiet=True)
    return str(out)


@pytest.fixture(scope="session")
def tiny_base(small_data, tmp_path_factory):
    """A tiny base checkpoint (150 steps on small_data): real files, no knowledge."""
    import pretrain
    out = str(tmp_path_factory.mktemp("base"))
    pretrain.main(["--preset", "tiny", "--device", "cpu", "--no-behaviour-eval", "--data",
                   small_data, "--out-dir", out, "--steps", "150", "--eval-iters", "1"])
    return out


@pytest.fixture(scope="session")
def tiny_sft(tiny_base, tmp_path_factory):
    """A tiny SFT checkpoint (tiny preset on the bundled chats) from tiny_base."""
    import sft
    out = str(tmp_path_factory.mktemp("sft"))
    sft.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_base, "--out-dir", out,
              "--no-behaviour-eval"])
    return out


@pytest.fixture(scope="session")
def tiny_reward(tiny_sft, tmp_path_factory):
    """A tiny reward model (32 prompts ranked by the teacher) from tiny_sft."""
    import reward
    out = str(tmp_path_factory.mktemp("reward"))
    reward.main(["--preset", "tiny", "--device", "cpu", "--init-from", tiny_sft, "--out-dir", out,
                 "--prompts", "32", "--no-behaviour-eval"])
    return out


def torchrun(script, args, nproc=2):
    """Run SCRIPT ARGS as `torchrun --standalone --nproc_per_node=NPROC` on the CPU (gloo)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           f"--nproc_per_node={nproc}", os.path.join(ROOT, script), *args],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (f"torchrun {script} failed:\n{done.stdout[-3000:]}\n"
                                  f"{done.stderr[-6000:]}")
