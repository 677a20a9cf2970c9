"""plot.py on real logs of the tiny runs: a PNG per run, panels by stage, clear errors."""
import shutil
import sys

import pytest

import plot
from ground import jsonl_rows


@pytest.mark.parametrize("run,stage", [("tiny_base", "base"), ("tiny_sft", "sft"),
                                       ("tiny_reward", "reward")])
def test_each_stage_gets_its_panels_in_a_png(run, stage, request, tmp_path):
    folder = tmp_path / stage
    folder.mkdir()
    shutil.copy(f"{request.getfixturevalue(run)}/log.jsonl", folder / "log.jsonl")
    rows = [row for _, row in jsonl_rows(folder / "log.jsonl")]
    assert plot.stage_of(rows) == stage
    plot.main([str(folder)])
    assert (folder / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_a_folder_without_a_log_and_a_missing_matplotlib_get_one_line(tiny_base, tmp_path,
                                                                      capsys, monkeypatch):
    with pytest.raises(SystemExit):
        plot.main([str(tmp_path)])
    assert "no log.jsonl" in capsys.readouterr().err
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as if it were not installed
    with pytest.raises(SystemExit):
        plot.main([tiny_base, "--out", str(tmp_path / "x.png")])
    assert "pip install matplotlib" in capsys.readouterr().err


def test_a_ppo_log_is_told_by_its_keys():
    assert plot.stage_of([{"step": 1, "score": 0.1, "gold_score": 0.6, "kl": 0.0}]) == "ppo"
