"""The shape of the code: imports only go down the rooms of kd/, each runtime decision is made in one place, a
new reported figure is one Metric, and the package's entry point is the command line run.py calls."""
import ast
import json
import tomllib
from pathlib import Path

import pytest

import run
from kd.measure import metrics

ROOT = Path(__file__).resolve().parents[1]
# Rooms from the top down: a module imports from its own room or from rooms further down, never up.
ROOMS = ["cli", "study", "deploy", "train", "measure|data", "ground"]
GROUND = {"config", "registry", "store", "device", "errors", "log"}


def room(module):
    """The room of a module under kd ('kd.train.step' -> 'train', 'kd.store' -> 'ground')."""
    part = module.split(".")[1]
    return "ground" if part in GROUND else next(r for r in ROOMS if part in r.split("|"))


def kd_imports(path):
    """Every kd module a file imports, at its top or inside a function."""
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd."):
            yield node.module
        elif isinstance(node, ast.ImportFrom) and node.module == "kd":
            yield from (f"kd.{alias.name}" for alias in node.names)
        elif isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names if alias.name.startswith("kd."))


def test_imports_never_point_up_the_rooms_of_kd():
    level = {r: i for i, r in enumerate(ROOMS)}
    upward = []
    for path in sorted((ROOT / "kd").rglob("*.py")):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        if module.endswith("__init__") and module.count(".") == 1:
            continue
        here = room(module)
        for imported in kd_imports(path):
            there = room(imported)
            if level[there] < level[here] or (level[there] == level[here] and there != here and here != "ground"):
                upward.append(f"{module} ({here}) imports {imported} ({there})")
            if here == there == "measure|data" and imported.split(".")[1] != module.split(".")[1]:
                upward.append(f"{module} imports {imported}: data and measure stand side by side")
    assert not upward, "\n".join(upward)


def test_each_runtime_decision_is_resolved_in_one_place():
    """Precision, compile mode, CUDA graph and fused optimizer are decided by kd/device.py's resolve_recipe; the
    trainer, the cache, the report and bench.py read its Recipe."""
    resolvers = {"resolve_amp", "resolve_compile", "graph_obstacle", "fused_optimizer", "resolve_recipe"}
    callers = {}
    for path in [*sorted((ROOT / "kd").rglob("*.py")), ROOT / "bench.py", ROOT / "run.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", getattr(node.func, "attr", None)) in resolvers:
                callers.setdefault(node.func.id if isinstance(node.func, ast.Name) else node.func.attr,
                                   set()).add(path.relative_to(ROOT).as_posix())
    assert callers.pop("resolve_recipe") == {"kd/device.py", "bench.py"}  # setup, and bench's compile modes
    assert callers == {name: {"kd/device.py"} for name in resolvers - {"resolve_recipe"}}


@pytest.mark.slow
def test_a_new_figure_is_one_metric(smoke_config, monkeypatch):
    """One Metric, measured on every model and derived against the teacher, reaches report.json and report.md."""
    buffers = metrics.Metric("buffer_elements", "buffer elements", cell=lambda r, k: f"{r[k]:,}",
                             measure=lambda model, shape, device: sum(b.numel() for b in model.buffers()))
    reduction = metrics.Metric("buffer_reduction", "buffers vs teacher", cell=lambda r, k: f"{r[k]:.1f}x",
                               derive=metrics.ratio("buffer_elements"))
    monkeypatch.setattr(metrics, "METRICS", [*metrics.METRICS, buffers, reduction])
    cfg = smoke_config(train={"epochs": 1, "warmup_epochs": 0}, stages=[{"name": "baseline"}])
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    folder = cfg.parent / "runs" / "smoke"
    models = json.loads((folder / "report.json").read_text())["models"]
    teacher, student = models["teacher"]["buffer_elements"], models["baseline"]["buffer_elements"]
    assert teacher > student > 0
    assert models["baseline"]["buffer_reduction"] == pytest.approx(teacher / student)
    header = next(line for line in (folder / "report.md").read_text().splitlines() if line.startswith("| model"))
    assert header.endswith("| buffer elements | buffers vs teacher |")


def test_the_package_installs_the_command_line_run_py_calls():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())
    module, _, name = project["project"]["scripts"]["kd"].partition(":")
    assert module == "kd.cli" and run.main is getattr(__import__(module, fromlist=[name]), name)
    assert project["tool"]["ruff"]["line-length"] == 120
    assert "slow" in project["tool"]["pytest"]["ini_options"]["markers"][0]
