"""The extension path a user takes: a method registered outside kd/ works from a config, with no edit to any
other file; in-process (registered by this test module) and from the command line (through `plugins:`)."""
import json
import subprocess
import sys

import pytest
import torch.nn.functional as F
from torch import nn

import run
from kd.train.losses import FEATURE_LOSSES
from kd.train.losses.base import embedding, embedding_size


@FEATURE_LOSSES.register("test_cosine")
class CosineEmbedding(nn.Module):
    """scale * (1 - cosine similarity) of pooled embeddings, the student's through a learned linear map."""
    layers = 1

    def __init__(self, probe, scale: float = 1.0):
        super().__init__()
        self.proj = nn.Linear(embedding_size(probe.student_shapes[0]), embedding_size(probe.teacher_shapes[0]))
        self.scale = scale

    def forward(self, student_features, teacher_features, step=None):
        s, t = self.proj(embedding(student_features[0])), embedding(teacher_features[0])
        return self.scale * (1 - F.cosine_similarity(s, t, dim=1)).mean()


@pytest.mark.slow
def test_method_registered_in_a_test_module_runs_from_a_config(smoke_config, tmp_path):
    cfg = smoke_config(stages=[{"name": "cosine", "logit": {"name": "kd"}, "features": [
        {"name": "test_cosine", "student": "stages.2", "teacher": "layer4", "scale": 2.0, "weight": 0.5}]}])
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    row = json.loads((tmp_path / "runs" / "smoke" / "report.json").read_text())["models"]["cosine"]
    assert row["method_params"] == 32 * 512 + 512  # the learned map: trained, counted apart, not deployed
    metrics = (tmp_path / "runs" / "smoke" / "cosine" / "metrics.csv").read_text().splitlines()
    header, first = metrics[0].split(","), metrics[1].split(",")
    assert float(first[header.index("train_feat0")]) > 0


PLUGIN = '''
import torch.nn.functional as F
from torch import nn

from kd.train.losses import LOGIT_LOSSES


@LOGIT_LOSSES.register("plugin_l2")
class LogitL2(nn.Module):
    """Mean squared difference of logits (Ba & Caruana 2014), from a file outside the package."""

    def __init__(self, ce_weight: float = 0.5):
        super().__init__()
        self.ce_weight = ce_weight

    def forward(self, student_logits, teacher_logits, step=None):
        return F.mse_loss(student_logits.float(), teacher_logits.float())
'''


@pytest.mark.slow
def test_plugin_file_named_in_the_config_adds_a_method_to_the_command_line(smoke_config, tmp_path, root,
                                                                           one_error_line):
    (tmp_path / "my_methods.py").write_text(PLUGIN)
    cfg = smoke_config(plugins=["my_methods.py"], stages=[{"name": "l2", "logit": {"name": "plugin_l2"}}])
    proc = subprocess.run([sys.executable, str(root / "run.py"), "--config", str(cfg), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr
    assert "| l2 |" in (tmp_path / "runs" / "smoke" / "report.md").read_text()

    broken = smoke_config(plugins=["missing.py"], stages=[{"name": "l2", "logit": {"name": "plugin_l2"}}])
    proc = subprocess.run([sys.executable, str(root / "run.py"), "--config", str(broken)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=600)
    err = one_error_line.process(proc)
    assert err.startswith(f"error: {broken}: plugins[0]: cannot import plugin 'missing.py'"), err
