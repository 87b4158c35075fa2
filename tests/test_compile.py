"""`train.compile`: the distillation step as compiled graphs (teacher-cache lookup and feature taps inside, no graph
break), training as the eager step does, a compiler that fails as one line naming the key, and `auto` per device."""
import csv
import json

import pytest
import torch
import yaml
from torch._dynamo.utils import counters

import kd.train.trainer
import run
from kd.device import resolve_compile


def metrics(tmp_path, name):
    with open(tmp_path / "runs" / name / "kdf" / "metrics.csv") as f:
        return list(csv.DictReader(f))


def config(tmp_path, make_config, name, compile_mode, cache="logits+features"):
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(make_config(name=name, train={"epochs": 2, "compile": compile_mode},
                                               cache={"mode": cache})))
    return path


def study(*args, **kwargs):
    return run.main(["--config", str(config(*args, **kwargs)), "--device", "cpu"])


@pytest.mark.slow
@pytest.mark.parametrize("cache", ["logits+features", "logits"])  # features from the cache, or a cut teacher
def test_the_compiled_step_trains_as_the_eager_one_in_one_graph(make_config, tmp_path, cache):
    assert study(tmp_path, make_config, "eager", "off", cache) == 0
    torch._dynamo.reset()
    counters.clear()
    assert study(tmp_path, make_config, "compiled", "default", cache) == 0
    # one graph: training progress and the cache view reach it as tensors, and validation's records are dropped, so
    # no recompiling for each step, view or epoch
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])
    assert not counters["graph_break"], dict(counters["graph_break"])
    eager, compiled = metrics(tmp_path, "eager"), metrics(tmp_path, "compiled")
    assert len(eager) == len(compiled) == 2
    for a, b in zip(eager, compiled):
        for key in ("train_loss", "train_ce", "train_logit", "train_feat0"):
            assert float(b[key]) == pytest.approx(float(a[key]), rel=1e-3), key


@pytest.mark.slow
def test_a_compiler_failure_is_one_line_naming_the_key(make_config, tmp_path, monkeypatch, one_error_line):
    def no_compiler(graph, example_inputs):
        raise RuntimeError("no C++ compiler found")
    compile_ = torch.compile
    monkeypatch.setattr(kd.train.trainer.torch, "compile",
                        lambda model, mode=None: compile_(model, backend=no_compiler))
    torch._dynamo.reset()
    err = one_error_line.study(config(tmp_path, make_config, "broken", "default"))
    assert "train.compile: torch.compile (mode 'default') failed in kdf: no C++ compiler found; set it to off" in err


@pytest.mark.slow
def test_auto_compiles_nowhere_as_measured(make_config, tmp_path, monkeypatch, capsys):
    """On a GPU the step's CUDA graph (train.graph) leaves compiling too little to repay its cost; on the CPU it
    measured slower."""
    assert [resolve_compile(m, torch.device(d)) for m in ("auto", "off", "default") for d in ("cpu", "cuda")] == \
        ["off", "off", "off", "off", "default", "default"]
    monkeypatch.setattr(kd.train.trainer.torch, "compile", lambda *a, **k: pytest.fail("compiled"))
    assert study(tmp_path, make_config, "auto", "auto") == 0
    assert "[compile] train.compile: auto -> off (on cpu)" in capsys.readouterr().out
    report = json.loads((tmp_path / "runs" / "auto" / "report.json").read_text())
    assert report["meta"]["compile"] == {"teacher.train.compile": "off", "train.compile": "off"}


@pytest.mark.slow
def test_graph_on_without_a_gpu_is_one_line_and_auto_says_why_it_is_off(make_config, tmp_path, capsys,
                                                                        one_error_line):
    path = tmp_path / "on.yaml"
    path.write_text(yaml.safe_dump(make_config(name="on", train={"epochs": 1, "graph": "on"})))
    assert one_error_line.study(path) == (f"error: {path}: train.graph: 'on', but CUDA graphs need a CUDA device, "
                                          "not cpu; set it to auto or off")
    assert study(tmp_path, make_config, "auto_graph", "off") == 0
    assert "[graph] teacher.train.graph and train.graph: auto -> off (CUDA graphs need a CUDA device, not cpu)" \
        in capsys.readouterr().out
