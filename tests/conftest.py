"""Shared fixtures: a small prepared corpus (a slice of the bundled world) trains in seconds."""
import os

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
