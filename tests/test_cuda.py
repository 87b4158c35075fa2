"""On a CUDA GPU (skipped elsewhere): every method, several seeds and the teacher cache in one study, with the
precision `amp: auto` picks there. `pytest -q tests/test_cuda.py` on a GPU machine."""
import json

import pytest
import torch

import run
from kd.device import resolve_amp

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


@pytest.mark.parametrize("cache", ["off", "logits+features"])
def test_every_method_over_two_seeds_on_cuda(smoke_config, in_memory_data, tmp_path, capsys, cache):
    """The second seed of a feature stage sizes its connectors with the teacher already on the GPU: this crashed
    before dry passes ran on each model's own device."""
    cfg = smoke_config(seeds=[0, 1], stages=EVERY_METHOD, data=in_memory_data,
                       cache={"mode": cache, "views": 2, "dir": str(tmp_path / "cache")})
    assert run.main(["--config", str(cfg), "--device", "cuda"]) == 0, capsys.readouterr().err
    report = json.loads((cfg.parent / "runs" / "smoke" / "report.json").read_text())
    assert list(report["models"]) == ["teacher"] + [s["name"] for s in EVERY_METHOD]
    amp = resolve_amp("auto", torch.device("cuda"))
    assert report["meta"]["precision"]["train.amp"] == ("fp32" if amp == "off" else amp)
    assert amp == ("bf16" if torch.cuda.is_bf16_supported() else "off")
    for name, row in report["models"].items():
        assert 0 <= row["test_top1"] <= 1 and row["latency_b1_ms"] > 0, name
