"""On a CUDA GPU (skipped elsewhere): every method, several seeds and the teacher cache in one study, with the
precision `amp: auto` picks there and every step captured in a CUDA graph; that graph against the eager step, and
resumed after an interruption. `pytest -q tests/test_cuda.py` on a GPU machine."""
import csv
import json

import pytest
import torch

import run
from kd.device import resolve_amp
from kd.train.step import WARMUP, TrainStep

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

EVERY_METHOD = [
    {"name": "baseline"},
    {"name": "kd", "logit": {"name": "kd"}},
    {"name": "dkd", "logit": {"name": "dkd", "warmup": 1.0}},
    {"name": "dist", "logit": {"name": "dist"}},
    {"name": "kd_ls", "logit": {"name": "kd", "temperature": 2.0, "scale": 10.0, "standardize": True}},
    {"name": "fitnets", "features": [{"name": "fitnets", "student": "stages.1", "teacher": "layer2"}]},
    {"name": "at", "features": [{"name": "at", "student": ["stages.1", "stages.2"], "teacher": ["layer2", "layer3"]}]},
    {"name": "rkd", "features": [{"name": "rkd", "student": "pool", "teacher": "avgpool"}]},
    {"name": "crd", "features": [{"name": "crd", "student": "pool", "teacher": "avgpool", "nce_k": 16}]},
    {"name": "reviewkd", "features": [{"name": "reviewkd", "student": ["stages.1", "stages.2", "pool"],
                                        "teacher": ["layer2", "layer3", "avgpool"]}]},
    {"name": "kd_fitnets", "logit": {"name": "kd"},
     "features": [{"name": "fitnets", "student": "stages.2", "teacher": "layer3"}]},
]


@pytest.fixture
def in_memory_data(fashion_files):
    return {"dataset": "fashion_mnist", "root": fashion_files(160, 64), "download": False, "pipeline": "tensor"}


@pytest.mark.parametrize("cache", ["off", "logits", "logits+features"])
@pytest.mark.slow
def test_every_method_over_two_seeds_on_cuda(smoke_config, in_memory_data, tmp_path, capsys, cache):
    """The second seed of a feature stage sizes its connectors with the teacher already on the GPU: this crashed
    before dry passes ran on each model's own device. Under `logits`, where only the feature stages differ from
    `logits+features` (they cut the teacher after their layers), the feature stages alone."""
    stages = [s for s in EVERY_METHOD if "features" in s or cache != "logits"]
    cfg = smoke_config(seeds=[0, 1], stages=stages, data=in_memory_data,
                       cache={"mode": cache, "views": 2, "dir": str(tmp_path / "cache")})
    assert run.main(["--config", str(cfg), "--device", "cuda"]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    assert "train.graph: auto -> on" in out and "cannot be captured" not in out, out
    report = json.loads((cfg.parent / "runs" / "smoke" / "report.json").read_text())
    assert list(report["models"]) == ["teacher"] + [s["name"] for s in stages]
    amp = resolve_amp("auto", torch.device("cuda"))
    assert report["meta"]["precision"]["train.amp"] == ("fp32" if amp == "off" else amp)
    assert amp == ("bf16" if torch.cuda.is_bf16_supported() else "off")
    for name, row in report["models"].items():
        assert 0 <= row["test_top1"] <= 1 and row["latency_b1_ms"] > 0, name


@pytest.mark.slow
def test_the_step_in_one_cuda_graph_trains_as_the_eager_step(smoke_config, in_memory_data, tmp_path, monkeypatch,
                                                             capsys):
    """train.graph: the whole step (live teacher, feature taps, every loss term, backward, fused optimizer, running
    sums) captured once and replayed; the learning rate and training progress reach the replays as tensors."""
    replays = []
    graph_class = torch.cuda.CUDAGraph

    class Counted(graph_class):
        def replay(self):
            replays.append(1)
            super().replay()
    monkeypatch.setattr(torch.cuda, "CUDAGraph", Counted)
    stage = {"name": "dkd_fitnets", "logit": {"name": "dkd", "warmup": 2.0},
             "features": [{"name": "fitnets", "student": "stages.2", "teacher": "layer3"}]}
    rows = {}
    for graph in ("off", "on"):
        cfg = smoke_config(name=f"graph_{graph}", seeds=[0], stages=[stage], data=in_memory_data,
                           train={"epochs": 3, "lr": 0.05, "warmup_epochs": 1, "graph": graph})
        assert run.main(["--config", str(cfg), "--device", "cuda"]) == 0, capsys.readouterr().err
        with open(cfg.parent / "runs" / f"graph_{graph}" / "dkd_fitnets" / "seed0" / "metrics.csv") as f:
            rows[graph] = list(csv.DictReader(f))
    steps = 3 * 3  # 96 training images in batches of 32, 3 epochs
    for eager, graphed in zip(rows["off"], rows["on"]):
        for key in ("train_loss", "train_ce", "train_logit", "train_feat0", "train_top1", "lr"):
            assert float(graphed[key]) == pytest.approx(float(eager[key]), rel=2e-2, abs=1e-3), key
    assert len(replays) == steps - WARMUP  # eager warm-up steps, then every step a replay (the captured one too)


def test_graph_on_where_it_cannot_be_is_one_line(smoke_config, in_memory_data, one_error_line):
    cfg = smoke_config(seeds=[0], stages=[{"name": "baseline"}], data=in_memory_data,
                       train={"epochs": 1, "graph": "on", "amp": "fp16"})
    err = one_error_line.cli("--config", cfg, "--device", "cuda")
    assert err.endswith("train.graph: 'on', but fp16 loss scaling reads its overflow check on the host every step; "
                        "set it to auto or off"), err


@pytest.mark.slow
def test_an_interrupted_graphed_student_resumes_to_the_uninterrupted_result(smoke_config, in_memory_data,
                                                                           monkeypatch, capsys):
    """Resuming under train.graph: the optimizer's learning rate is a device tensor in last.pt, and the resumed
    trainer warms up and captures its graph again."""
    stages = [{"name": "kd", "logit": {"name": "kd"}}]
    runs = {name: smoke_config(name=name, seeds=[0], stages=stages, data=in_memory_data,
                               train={"epochs": 3, "lr": 0.05, "warmup_epochs": 1, "graph": "on",
                                      "checkpoint_seconds": 0})
            for name in ("full", "resumed")}
    assert run.main(["--config", str(runs["full"]), "--device", "cuda"]) == 0, capsys.readouterr().err
    calls, step = [0], TrainStep.__call__

    def dies_in_second_epoch(self, batch, progress):
        calls[0] += self.key == "train"
        if calls[0] == 5:  # 3 batches per epoch: the second step of epoch 2, after the graph was captured
            raise KeyboardInterrupt
        return step(self, batch, progress)
    monkeypatch.setattr(TrainStep, "__call__", dies_in_second_epoch)
    assert run.main(["--config", str(runs["resumed"]), "--device", "cuda"]) == 130
    monkeypatch.setattr(TrainStep, "__call__", step)
    assert run.main(["--config", str(runs["resumed"]), "--device", "cuda", "--resume"]) == 0, capsys.readouterr().err
    rows = {}
    for name, cfg in runs.items():
        with open(cfg.parent / "runs" / name / "kd" / "seed0" / "metrics.csv") as f:
            rows[name] = list(csv.DictReader(f))
    assert len(rows["full"]) == len(rows["resumed"]) == 3
    tolerance = {"train_loss": {"rel": 2e-2}, "lr": {"rel": 1e-6}, "train_top1": {"abs": 0.05},
                 "val_top1": {"abs": 0.05}}
    for full, resumed in zip(rows["full"], rows["resumed"]):  # within GPU run-to-run noise (cuDNN's choices)
        for key, tol in tolerance.items():
            assert float(resumed[key]) == pytest.approx(float(full[key]), **tol), key
