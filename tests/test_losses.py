"""Distillation losses: hand computations, gradients, and hooks/connectors for the shipped configs."""
import math
from pathlib import Path

import pytest
import torch

from kd.config import StageConfig, from_dict, load_config
from kd.data.tensors import Batch
from kd.train.distiller import Distiller
from kd.train.losses import Probe
from kd.train.losses.fitnets import FitNets
from kd.train.losses.kd import KD
from kd.train.models import create_model

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def softmax(xs):
    exps = [math.exp(x) for x in xs]
    return [e / sum(exps) for e in exps]


def test_kd_matches_hand_computation_with_t_squared_scaling():
    s, t = [[1.0, 2.0, 0.5]], [[3.0, 0.0, 1.0]]
    temperature, alpha = 2.0, 0.7
    p_s = softmax([x / temperature for x in s[0]])
    p_t = softmax([x / temperature for x in t[0]])
    kl = sum(pt * math.log(pt / ps) for pt, ps in zip(p_t, p_s))
    loss = KD(temperature, alpha)(torch.tensor(s), torch.tensor(t))
    assert loss.item() == pytest.approx(alpha * temperature ** 2 * kl, rel=1e-5)


def test_kd_is_batch_mean_and_zero_when_logits_agree():
    torch.manual_seed(0)
    logits = torch.randn(8, 10)
    assert KD(4.0, 1.0)(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-6)
    s, t = torch.randn(2, 10), torch.randn(2, 10)
    single = [KD(4.0, 1.0)(s[i:i + 1], t[i:i + 1]) for i in range(2)]
    assert KD(4.0, 1.0)(s, t).item() == pytest.approx(sum(single).item() / 2, rel=1e-5)


def test_kd_keeps_the_rest_of_alpha_for_cross_entropy():
    assert KD(4.0, 0.9).ce_weight == pytest.approx(0.1)


@pytest.mark.parametrize("kwargs", [{"temperature": 0.0}, {"temperature": -1.0}, {"alpha": 1.5}, {"alpha": -0.1}])
def test_kd_rejects_out_of_range_parameters(kwargs):
    with pytest.raises(ValueError):
        KD(**kwargs)


def stage(logit=True, pairs=(("stages.1", "layer2"), ("stages.2", "layer3"))):
    raw = {"name": "s", "logit": {"name": "kd"} if logit else None,
           "features": [{"name": "fitnets", "student": s, "teacher": t, "weight": 1.0} for s, t in pairs]}
    return from_dict(StageConfig, raw)


def test_logit_and_feature_losses_are_nonzero_and_reach_the_student_only(teacher_student):
    teacher, student = teacher_student
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    distiller = Distiller.build(stage(), student, teacher, x[:2], 0.0, "stages[0]").train()
    _, terms = distiller(Batch(x, y, torch.arange(4)))
    assert terms["logit"].item() > 0
    assert terms["feat0"].item() > 0 and terms["feat1"].item() > 0
    for term in ("logit", "feat0", "feat1"):
        distiller.zero_grad(set_to_none=True)
        terms[term].backward(retain_graph=True)
        first_conv = student.stages[0][0][0].weight
        assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0, term
        assert all(p.grad is None for p in teacher.parameters()), term
        if term.startswith("feat"):
            connector = distiller.features[int(term[-1])].connector.proj[0].weight
            assert connector.grad is not None and connector.grad.abs().sum() > 0, term


def test_feature_term_only_reaches_layers_up_to_the_hooked_one(teacher_student):
    teacher, student = teacher_student
    x, y = torch.randn(4, 1, 28, 28), torch.randint(0, 10, (4,))
    distiller = Distiller.build(stage(logit=False, pairs=[("stages.0", "layer1")]), student, teacher, x[:2], 0.0, "s")
    _, terms = distiller.train()(Batch(x, y, torch.arange(4)))
    terms["feat0"].backward()
    assert student.stages[0][0][0].weight.grad.abs().sum() > 0
    assert student.fc.weight.grad is None


def test_connector_matches_channels_and_both_resize_directions():
    for s_shape, t_shape in [((16, 14, 14), (128, 7, 7)), ((16, 4, 4), (64, 8, 8)), ((8, 7, 7), (32, 7, 7))]:
        method = FitNets(Probe([s_shape], [t_shape], 0, 10))
        out = method.connector(torch.randn(2, *s_shape))
        assert tuple(out.shape[1:]) == t_shape
        assert method([torch.randn(2, *s_shape)], [torch.randn(2, *t_shape)]).item() > 0


def test_teacher_stays_in_eval_mode_while_student_trains(teacher_student):
    teacher, student = teacher_student
    Distiller.build(stage(), student, teacher, torch.randn(2, 1, 28, 28), 0.0, "s").train()
    assert student.training and not teacher.training


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_feature_pair_in_shipped_configs_builds_and_matches_shapes(path, dataset_shapes):
    cfg = load_config(path)
    c, size, classes = dataset_shapes[cfg.data.dataset]
    x = torch.randn(2, c, size, size)
    for i, st in enumerate(s for s in cfg.stages if s.features):
        teacher = create_model(cfg.teacher.name, "teacher", cfg.teacher.kwargs, c, classes, size)
        student = create_model(cfg.student.name, "student", cfg.student.kwargs, c, classes, size)
        distiller = Distiller.build(st, student, teacher, x, 0.0, f"stages[{i}]", num_samples=50_000).train()
        _, terms = distiller(Batch(x, torch.zeros(2, dtype=torch.long), torch.arange(2)))
        for j in range(len(st.features)):
            assert terms[f"feat{j}"].item() > 0, (path.name, st.name, j)
