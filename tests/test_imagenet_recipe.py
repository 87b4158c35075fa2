"""configs/imagenet_r34_r18.yaml, the ResNet-34 -> ResNet-18 ImageNet benchmark: each distillation stage trains on
the objective of its authors' code with their ImageNet setting, torchvision's ResNet-34 weights fit its teacher
as they are, and cut to toy size (generated JPEG folders, a random ResNet-34 state dict as the teacher's weights)
the whole study runs, its teacher evaluated and not trained."""
import csv
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from torch import nn

import run
from kd.config import load_config
from kd.data.tensors import Batch
from kd.train.distiller import Distiller
from kd.train.models import create_model, load_weights


@pytest.fixture(scope="module")
def config(root):
    return root / "configs" / "imagenet_r34_r18.yaml"


# --- the reference objectives, as the authors' code computes them (CE included) --------------------------------------

def kl(p_log_target, p_log_student):
    """KL(target || student) per sample, from log-probabilities."""
    return (p_log_target.exp() * (p_log_target - p_log_student)).sum(1)


def mdistiller_kd(s, t, y, temperature=1.0, ce_weight=0.5, kd_weight=0.5):
    """mdistiller configs/imagenet/r34_r18/kd.yaml: CE 0.5, KD 0.5, T 1."""
    soft = kl(F.log_softmax(t / temperature, 1), F.log_softmax(s / temperature, 1)).mean() * temperature ** 2
    return ce_weight * F.cross_entropy(s, y) + kd_weight * soft


def mdistiller_dkd(s, t, y, alpha=1.0, beta=0.5, temperature=1.0, ce_weight=1.0, warmup=1, epoch=1):
    """mdistiller configs/imagenet/r34_r18/dkd.yaml (alpha from its cfg.py); its epochs count from 1, so a warm-up
    of 1 epoch is at full strength from the first step."""
    gt = F.one_hot(y, s.shape[1]).bool()
    p_s, p_t = F.softmax(s / temperature, 1), F.softmax(t / temperature, 1)
    binary = [torch.stack([(p * gt).sum(1), (p * ~gt).sum(1)], 1) for p in (p_s, p_t)]
    tckd = kl(binary[1].log(), binary[0].log()).mean()
    nckd = kl(F.log_softmax(t / temperature - 1000.0 * gt, 1), F.log_softmax(s / temperature - 1000.0 * gt, 1)).mean()
    ramp = min(epoch / warmup, 1.0)
    return ce_weight * F.cross_entropy(s, y) + ramp * temperature ** 2 * (alpha * tckd + beta * nckd)


def dist_authors(s, t, y, beta=1.0, gamma=1.0):
    """DIST's loss (image_classification_sota lib/models/losses/dist_kd.py: softmax of the logits as they are),
    beside the label cross-entropy."""
    def relation(a, b):
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return 1 - ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)).mean()
    p_s, p_t = s.softmax(1), t.softmax(1)
    return F.cross_entropy(s, y) + beta * relation(p_s, p_t) + gamma * relation(p_s.T, p_t.T)


REFERENCES = {"kd": mdistiller_kd, "dkd": mdistiller_dkd, "dist": dist_authors}


class Pick(nn.Module):
    """A model whose logits are one slice of its input: the student and teacher logits of a test, chosen exactly."""

    def __init__(self, i):
        super().__init__()
        self.i = i

    def forward(self, x):
        return x[:, self.i]


@pytest.mark.parametrize("stage", ["kd", "dkd", "dist"])
def test_each_stage_trains_on_its_authors_imagenet_objective_from_the_first_step(config, stage):
    cfg = load_config(config)
    (spec,) = [s for s in cfg.stages if s.name == stage]
    torch.manual_seed(0)
    logits = torch.randn(16, 2, 1000) * 3  # [:, 0] the student's, [:, 1] the teacher's
    labels = torch.randint(0, 1000, (16,))
    distiller = Distiller.build(spec, Pick(0), Pick(1), logits, cfg.train.label_smoothing, f"stages[{stage}]")
    _, terms = distiller(Batch(logits, labels, torch.arange(16)), epoch=0.0)
    expected = REFERENCES[stage](logits[:, 0], logits[:, 1], labels)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-5, atol=1e-6)


def test_the_recipe_is_the_standard_100_epoch_one_for_a_from_scratch_student(config):
    cfg = load_config(config)
    t = cfg.train
    assert (cfg.data.dataset, cfg.data.image_size, cfg.student.name, cfg.student.kwargs) == \
        ("imagenet", 224, "resnet18", {})
    assert t.lr / cfg.data.batch_size == pytest.approx(0.1 / 256)  # mdistiller: 0.2 for 512
    assert (t.epochs, t.optimizer, t.momentum, t.nesterov, t.weight_decay) == (100, "sgd", 0.9, False, 1e-4)
    assert (t.schedule, t.milestones, t.gamma, t.warmup_epochs, t.label_smoothing) == \
        ("step", [30, 60, 90], 0.1, 0, 0)
    assert [s.name for s in cfg.stages] == ["baseline", "kd", "dkd", "dist"] and cfg.stages[0].logit is None


def test_torchvisions_resnet34_weights_fit_the_teacher_as_they_are(config, tmp_path):
    cfg = load_config(config)
    assert (cfg.teacher.name, cfg.teacher.train.epochs) == ("resnet34", 0)
    path = tmp_path / "resnet34.pth"  # torchvision's architecture and keys; its pretrained values are not needed
    torch.save(torchvision.models.resnet34().state_dict(), path)
    teacher = create_model(cfg.teacher.name, "teacher", cfg.teacher.kwargs, 3, 1000, cfg.data.image_size)
    assert load_weights(teacher, cfg.teacher.name, str(path), "teacher.weights") == []  # nothing left untrained


# --- the study at toy size --------------------------------------------------------------------------------------------

def image_folders(root, classes=("n01440764", "n01443537"), train=6, val=2):
    """ImageNet's layout: train/<wnid>/ and val/<wnid>/ of JPEGs larger than the crop, of varied shapes."""
    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("val", val)):
        for c in classes:
            (root / split / c).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, (80 + 4 * i, 96, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(root / split / c / f"{c}_{i}.JPEG")
    return root


@pytest.mark.slow
def test_at_toy_size_the_study_runs_every_stage_with_the_teacher_evaluated_not_trained(config, tmp_path, capsys):
    data = image_folders(tmp_path / "imagenet")
    weights = tmp_path / "resnet34.pth"
    torch.manual_seed(0)
    state = torchvision.models.resnet34(num_classes=2).state_dict()
    torch.save(state, weights)
    sets = {"output_dir": tmp_path / "runs", "cache.dir": tmp_path / "cache", "data.root": data,
            "data.image_size": 72,  # above 64 px: files read per batch, ImageNet's stem, as at 224
            "data.val_size": 4, "data.batch_size": 4, "data.eval_batch_size": 4, "data.num_workers": 0,
            "teacher.weights": weights, "teacher.checkpoint": tmp_path / "teacher.pt",
            "train.epochs": 1, "train.milestones": [], "eval.batch_size": 2, "eval.warmup": 1, "eval.repeats": 1}
    argv = ["--config", config, "--device", "cpu"]
    for key, value in sets.items():
        argv += ["--set", f"{key}={value}"]
    assert run.main([str(a) for a in argv]) == 0
    assert f"[teacher] initialised from {weights}" in capsys.readouterr().out
    folder = tmp_path / "runs" / "imagenet_r34_r18"
    models = json.loads((folder / "report.json").read_text())["models"]
    assert list(models) == ["teacher", "baseline", "kd", "dkd", "dist"]
    assert models["teacher"]["epochs"] == 0
    assert models["teacher"]["params"] == 21_285_698  # ResNet-34 with ImageNet's stem, 2 classes
    for stage in ("baseline", "kd", "dkd", "dist"):
        with open(folder / stage / "metrics.csv") as f:
            rows = list(csv.DictReader(f))
        assert models[stage]["epochs"] == 1 and models[stage]["params"] == 11_177_538  # ResNet-18, the same
        assert len(rows) == 1 and np.isfinite(float(rows[0]["train_loss"])), (stage, rows)
        assert ("train_logit" in rows[0]) == (stage != "baseline"), (stage, rows)
    import kd.store
    kept = kd.store.load(tmp_path / "teacher.pt", "")["model"]  # epochs 0: the given weights, untouched
    assert kept.keys() == state.keys() and all(torch.equal(kept[k], state[k]) for k in state)
