"""One source of truth: run identity derived from the config's own field marks, features recorded by hooks
registered once (and visible to torch.compile), and a registry listing for newcomers."""
import dataclasses
import json
import subprocess
import sys

import pytest
import torch

import run
from kd.config import Config, StageConfig, from_dict, to_dict
from kd.data.tensors import Batch
from kd.store import fingerprint
from kd.train.distiller import Distiller, Taps, feature_layers
from kd.train.models import create_model

# Fields that never change what a model learns. A new field is part of identity unless marked NOT_RESULT in
# kd/config.py, and marking one must be a deliberate change to this list too.
NOT_RESULT = {"name", "output_dir", "plugins", "device", "deterministic", "data.root", "data.download",
              "data.eval_batch_size", "data.num_workers", "data.pipeline", "teacher.checkpoint", "teacher.train.graph",
              "train.graph", "teacher.train.checkpoint_seconds", "train.checkpoint_seconds",
              "teacher.accept_checkpoint", "cache.dir", "cache.batch_size", "eval.batch_size", "eval.warmup",
              "eval.repeats", "deploy.onnx", "deploy.int8", "deploy.calibration_images"}


def leaf_fields(obj, prefix=""):
    """(dotted name, owner object, field name) of every non-dataclass field of a config, nested ones included."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaf_fields(value, f"{prefix}{f.name}.")
        else:
            yield f"{prefix}{f.name}", obj, f.name


def minimal_config():
    return from_dict(Config, {"name": "s", "stages": [{"name": "kd", "logit": {"name": "kd"}}]})


def test_identity_is_every_field_but_the_marked_ones():
    names = [name for name, _, _ in leaf_fields(minimal_config())]
    assert NOT_RESULT <= set(names)
    reference = fingerprint(to_dict(minimal_config(), "results"))
    for name in names:
        cfg = minimal_config()
        _, owner, field = next(leaf for leaf in leaf_fields(cfg) if leaf[0] == name)
        setattr(owner, field, "changed")
        changed = fingerprint(to_dict(cfg, "results")) != reference
        assert changed == (name not in NOT_RESULT), name


@pytest.mark.slow
def test_settings_that_do_not_change_results_reuse_finished_stages(smoke_config, capsys):
    cfg = smoke_config(stages=[{"name": "baseline"}])
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    best = cfg.parent / "runs" / "smoke" / "baseline" / "best.pt"
    mtime = best.stat().st_mtime_ns
    capsys.readouterr()
    assert run.main(["--config", str(cfg), "--device", "cpu", "--set", "eval.repeats=2", "--set",
                     "data.eval_batch_size=16", "--set", "data.num_workers=1", "--set", "cache.batch_size=8"]) == 0
    assert "[baseline] finished earlier" in capsys.readouterr().out and best.stat().st_mtime_ns == mtime


@pytest.mark.slow
def test_a_changed_result_setting_names_what_changed(smoke_config, capsys, one_error_line):
    cfg = smoke_config(stages=[{"name": "baseline"}])
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert "finished under a different config (train.weight_decay: 0.0005 -> 0.001)" in \
        one_error_line.study(cfg, "--set", "train.weight_decay=0.001")


# --- feature taps -----------------------------------------------------------------------------------------------------

def models():
    torch.manual_seed(0)
    return (create_model("resnet18", "teacher", {}, 1, 10, 28),
            create_model("cnn", "student", {"channels": [8, 16, 32], "blocks": 1}, 1, 10, 28))


def stage(**feature):
    return from_dict(StageConfig, {"name": "s", "logit": {"name": "kd"}, "features": [
        {"name": "fitnets", "student": "stages.1", "teacher": "layer2", **feature}]})


def test_hooks_are_registered_once_and_shared_by_every_stage_of_a_teacher():
    teacher, _ = models()
    stages = [stage(), stage()]
    taps = Taps(teacher, feature_layers(stages, "teacher"))
    batch = Batch(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.arange(4))
    for st in stages:
        student = models()[1]
        distiller = Distiller.build(st, student, teacher, batch.images[:2], 0.0, "s", teacher_taps=taps).train()
        for _ in range(3):
            distiller(batch)
        assert len(student.stages[1]._forward_hooks) == 1
    assert len(teacher.layer2._forward_hooks) == 1 and taps.keys == ["layer2"]


def test_a_teachers_taps_keep_no_graph_alive_while_it_trains():
    """The study's taps on its teacher record on every forward pass, the teacher's own training included, where
    nothing takes them: a recorded map with its graph kept that step's autograd nodes alive into the next (on a
    GPU, PyTorch warned of a stream mismatch at the first step of a graphed teacher). The student's keep theirs."""
    teacher, student = models()
    distiller = Distiller.build(stage(), student, teacher, torch.randn(2, 1, 28, 28), 0.0, "s")
    teacher.train()(torch.randn(4, 1, 28, 28)).sum().backward()
    recorded = distiller.teacher_taps.outputs["layer2"]
    assert recorded.grad_fn is None and not recorded.requires_grad
    student.train()(torch.randn(4, 1, 28, 28))
    assert distiller.student_taps.take()["stages.1"].grad_fn is not None


def test_a_feature_can_be_a_module_input():
    """io: input takes what a module receives: the classifier's input is the flattened pooled features."""
    teacher, student = models()
    st = from_dict(StageConfig, {"name": "s", "features": [
        {"name": "rkd", "student": "fc", "teacher": "fc", "io": "input"}]})
    distiller = Distiller.build(st, student, teacher, torch.randn(2, 1, 28, 28), 0.0, "s").train()
    x = torch.randn(4, 1, 28, 28)
    _, terms = distiller(Batch(x, torch.randint(0, 10, (4,)), torch.arange(4)))
    assert terms["feat0"].item() > 0
    with torch.no_grad():
        teacher(x)
    recorded = distiller.teacher_taps.take()["fc:input"]
    assert torch.equal(recorded, torch.flatten(teacher.avgpool(teacher.layer4(teacher.layer3(teacher.layer2(
        teacher.layer1(teacher.relu(teacher.bn1(teacher.conv1(x)))))))), 1))


@pytest.mark.slow
def test_the_distillation_step_compiles_as_one_graph_with_its_feature_taps():
    teacher, student = models()
    distiller = Distiller.build(stage(), student, teacher, torch.randn(2, 1, 28, 28), 0.0, "s").train()
    batch = Batch(torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,)), torch.arange(4))
    _, eager = distiller(batch, 0.5)
    _, compiled = torch.compile(distiller, backend="eager", fullgraph=True)(batch, 0.5)
    assert eager.keys() == compiled.keys() == {"ce", "logit", "feat0", "loss"}
    for term in eager:
        assert compiled[term].item() == pytest.approx(eager[term].item(), rel=1e-5), term


# --- --list -----------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_list_prints_every_registered_name_with_its_parameters_and_a_config_plugins_too(tmp_path, root):
    plugin = tmp_path / "listed.py"
    plugin.write_text("from torch import nn\nfrom kd.train.losses import LOGIT_LOSSES\n\n\n"
                      "@LOGIT_LOSSES.register('listed_method')\nclass Listed(nn.Module):\n"
                      "    def __init__(self, tau: float = 2.0):\n        super().__init__()\n")
    config = tmp_path / "c.yaml"
    config.write_text(json.dumps({"name": "c", "plugins": ["listed.py"], "stages": [{"name": "b"}]}))
    out = subprocess.run([sys.executable, str(root / "run.py"), "--list", "--config", str(config)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for line in ("  kd(temperature: float = 4.0, alpha: float = 0.9, standardize: bool = False, scale: float = 1.0)",
                 "  crd(feat_dim: int = 128, nce_k: int = 16384, nce_t: float = 0.07, momentum: float = 0.5)",
                 "  cnn(channels: list[int] = (32, 64, 128), blocks: int = 2, stem_stride: int = 1)",
                 "  fashion_mnist()", "  listed_method(tau: float = 2.0)"):
        assert line in out.stdout, line
