"""The shape of the house: imports run one way, and every file can be read in one sitting."""
import ast
import json
import os

import pytest

from tests.conftest import ROOT

STAGES = {"pretrain", "sft", "reward", "ppo", "bench", "sample", "export", "plot",  # scripts
          "serve"}
LIBRARY = {"model", "common", "evaluation", "data"}  # what a script may import from the project


def scripts():
    """The stage scripts, and the experiments (which run stage scripts as processes)."""
    stages = [name + ".py" for name in STAGES if os.path.exists(os.path.join(ROOT, name + ".py"))]
    experiments = [os.path.join("experiments", f)
                   for f in os.listdir(os.path.join(ROOT, "experiments")) if f.endswith(".py")]
    return sorted(stages + experiments)


def project_imports(path):
    """The project modules a file imports, anywhere in it (inside functions too)."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & (STAGES | LIBRARY)


@pytest.mark.parametrize("path", scripts())
def test_a_script_imports_only_library_modules(path):
    imported = project_imports(os.path.join(ROOT, path))
    assert imported <= LIBRARY, f"{path} imports {sorted(imported - LIBRARY)}: a stage script"


@pytest.mark.parametrize("path", ["model.py", "common.py", "evaluation.py"]
                         + [os.path.join("data", f) for f in sorted(os.listdir(
                             os.path.join(ROOT, "data"))) if f.endswith(".py")])
def test_library_modules_never_import_a_stage_script(path):
    imported = project_imports(os.path.join(ROOT, path))
    assert not imported & STAGES, f"{path} imports {sorted(imported & STAGES)}"
    if path == "model.py":  # the network stands alone: anyone can copy it out
        assert not imported, f"model.py imports {sorted(imported)}"


def test_the_checker_sees_a_stage_import(tmp_path):
    (tmp_path / "x.py").write_text("import os\ndef f():\n    from pretrain import batch\n")
    assert project_imports(tmp_path / "x.py") == {"pretrain"}


@pytest.mark.parametrize("path", sorted(f for f in os.listdir(ROOT) if f.endswith(".py"))
                         + [p for p in scripts() if p.startswith("experiments")])
def test_functions_fit_on_a_screen_and_stage_files_in_a_sitting(path):
    source = open(os.path.join(ROOT, path)).read()
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(ast.parse(source))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > 65]
    assert not long, f"{path}: functions longer than about 60 lines: {long}"
    if path[:-3] in STAGES | {"model"}:
        assert source.count("\n") <= 450, f"{path}: {source.count(chr(10))} lines"


def test_bench_measures_the_pretrain_presets():
    import bench
    import pretrain
    from dataclasses import asdict
    for name, shape in bench.SHAPES.items():
        settings = {**asdict(pretrain.Settings()), **pretrain.PRESETS[name]}
        assert shape == {k: settings[k] for k in shape}, name


def test_bench_writes_its_json(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "bench.json"
    subprocess.run([sys.executable, "bench.py", "--preset", "tiny", "--device", "cpu", "--only",
                    "reward", "--only", "train", "--steps", "2", "--out", str(out)], cwd=ROOT,
                   check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["train"]["tokens_per_s"] > 0
    assert result["reward"]["answers_per_s"] > 0 and result["reward"]["comparisons_per_s"] > 0
