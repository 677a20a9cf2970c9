"""The shape of the house: imports run one way, and every file can be read in one sitting."""
import ast
import json
import os

import pytest

from tests.conftest import ROOT

STAGES = {"pretrain", "sft", "reward", "ppo", "dpo", "grpo", "bench", "sample", "export",  # scripts
          "plot", "serve"}
LIBRARY = {"model", "ground", "cli", "training", "checkpoints", "evaluation", "scoring", "rl",
           "data"}  # what a script may import from the project


def scripts():
    """The stage scripts, and the experiments (which run stage scripts as processes)."""
    stages = [name + ".py" for name in STAGES if os.path.exists(os.path.join(ROOT, name + ".py"))]
    experiments = [os.path.join("experiments", f)
                   for f in os.listdir(os.path.join(ROOT, "experiments")) if f.endswith(".py")]
    return sorted(stages + experiments)


def module_imports(path):
    """The modules and packages a file imports, anywhere in it (inside functions too); data.x
    counts as data."""
    found = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


def project_imports(path):
    """The project modules a file imports."""
    return module_imports(path) & (STAGES | LIBRARY)


@pytest.mark.parametrize("path", scripts())
def test_a_script_imports_only_library_modules(path):
    imported = project_imports(os.path.join(ROOT, path))
    assert imported <= LIBRARY, f"{path} imports {sorted(imported - LIBRARY)}: a stage script"


def library_files():
    return sorted(name + ".py" for name in LIBRARY - {"data"}) + [
        os.path.join("data", f) for f in sorted(os.listdir(os.path.join(ROOT, "data")))
        if f.endswith(".py")]


@pytest.mark.parametrize("path", library_files())
def test_library_modules_never_import_a_stage_script(path):
    imported = project_imports(os.path.join(ROOT, path))
    assert not imported & STAGES, f"{path} imports {sorted(imported & STAGES)}"
    if path == "model.py":  # the network stands alone: anyone can copy it out
        assert not imported, f"model.py imports {sorted(imported)}"


@pytest.mark.parametrize("path", ["ground.py", "plot.py", "data/comparisons.py",
                                  "data/prepare.py", "data/chats.py", "data/teacher.py"])
def test_the_ground_and_what_reads_files_import_no_torch(path):
    """Errors, flag types and file reading stand on ground.py, which needs no torch: the data
    tools and the plots load without it."""
    seen, todo = [], [path]
    while todo:  # follow the project's own imports to the bottom
        current = todo.pop()
        seen.append(current)
        imported = module_imports(os.path.join(ROOT, current))
        assert "torch" not in imported, f"{path} reaches torch through {current}"
        for name in imported & (LIBRARY - {"data"}):
            if name + ".py" not in seen + todo:
                todo.append(name + ".py")
        if "data" in imported:  # any module of data/ (each of them, to be sure)
            todo += [path for path in library_files()
                     if path.startswith("data") and path not in seen + todo]


def test_library_imports_have_no_cycle():
    """The library's modules import one another one way: a newcomer can read them bottom-up."""
    graph = {name: module_imports(os.path.join(ROOT, name + ".py")) & (LIBRARY - {"data"})
             for name in LIBRARY - {"data"}}
    done, path = set(), []

    def visit(name):
        assert name not in path, "import cycle: " + " -> ".join(path + [name])
        if name in done:
            return
        path.append(name)
        for imported in sorted(graph[name] - {name}):
            visit(imported)
        path.pop()
        done.add(name)
    for name in sorted(graph):
        visit(name)


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


def python_files():
    folders = [ROOT] + [os.path.join(ROOT, d) for d in ("data", "experiments", "tests")]
    return sorted(os.path.relpath(os.path.join(folder, f), ROOT) for folder in folders
                  for f in os.listdir(folder) if f.endswith(".py"))


def test_lines_fit_in_100_columns():
    long = [f"{path}:{n}" for path in python_files()
            for n, line in enumerate(open(os.path.join(ROOT, path), encoding="utf-8"), 1)
            if len(line.rstrip("\n")) > 100]
    assert not long, f"lines over 100 columns: {long}"


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
                    "reward", "--only", "train", "--only", "nanogpt", "--steps", "2", "--out",
                    str(out)], cwd=ROOT, check=True, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    assert result["preset"] == "tiny" and result["train"]["tokens_per_s"] > 0
    side_by_side = result["nanogpt"]  # equal FLOPs per token, or the ratio means nothing
    assert side_by_side["project"]["flops_per_token"] == side_by_side["nanogpt"]["flops_per_token"]
    assert side_by_side["speed_ratio"] > 0
    assert result["reward"]["answers_per_s"] > 0 and result["reward"]["comparisons_per_s"] > 0


def test_time_to_quality_follows_pretrains_own_run_in_pieces(small_data, monkeypatch):
    import bench
    monkeypatch.setattr(bench, "QUALITY_TARGETS", {"val_loss": 1e9, "fewshot": 2.0})  # at once;
    result = bench.bench_quality("tiny", "cpu", 10, ["--data", small_data, "--steps", "20",
                                                     "--eval-iters", "1"])  # and never
    assert [row["step"] for row in result["curve"]] == [10, 20]
    first, last = result["curve"]
    assert 0 <= first["train_seconds"] < last["train_seconds"]
    assert last["val_loss"] < first["val_loss"]
    assert result["seconds_to_val_loss"] == first["train_seconds"]
    assert result["seconds_to_fewshot"] is None
