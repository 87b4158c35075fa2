"""Every registered distillation method: a property from its paper or a hand computation, gradients reaching the
student (and the method's own modules), and clear errors for bad parameters."""
import math

import pytest
import torch
import torch.nn.functional as F

from kd.config import StageConfig, from_dict
from kd.data.tensors import Batch
from kd.errors import ConfigError
from kd.train.distiller import Distiller
from kd.train.losses import FEATURE_LOSSES, LOGIT_LOSSES, Probe, Step
from kd.train.losses.at import AT
from kd.train.losses.crd import CRD
from kd.train.losses.dist import DIST
from kd.train.losses.dkd import DKD, decoupled_kl
from kd.train.losses.kd import KD
from kd.train.losses.reviewkd import ReviewKD, hcl
from kd.train.losses.rkd import RKD


def probe(student_shapes, teacher_shapes, num_samples=100):
    return Probe(student_shapes, teacher_shapes, num_samples, 10)


# --- logit methods ----------------------------------------------------------------------------------------------------

def test_dkd_parts_sum_back_to_kd_per_sample():
    torch.manual_seed(0)
    s, t, y = torch.randn(6, 10) * 3, torch.randn(6, 10) * 3, torch.randint(0, 10, (6,))
    temperature = 2.0
    tckd, nckd = decoupled_kl(s, t, y, temperature)
    p_t = F.softmax(t / temperature, 1)
    kl = (p_t * (F.log_softmax(t / temperature, 1) - F.log_softmax(s / temperature, 1))).sum(1)
    rest = 1 - p_t.gather(1, y[:, None])[:, 0]
    torch.testing.assert_close(tckd + rest * nckd, kl, rtol=1e-5, atol=1e-6)
    assert (tckd >= -1e-6).all() and (nckd >= -1e-6).all()


def test_dkd_weights_its_parts_and_ramps_in_over_the_warmup():
    torch.manual_seed(1)
    s, t, y = torch.randn(4, 10), torch.randn(4, 10), torch.randint(0, 10, (4,))
    tckd, nckd = decoupled_kl(s, t, y, 4.0)
    full = DKD(alpha=1.0, beta=8.0, temperature=4.0, warmup=2.0)
    expected = 16 * (tckd.mean() + 8 * nckd.mean())
    torch.testing.assert_close(full(s, t, Step(y, epoch=5.0)), expected)
    torch.testing.assert_close(full(s, t, Step(y, epoch=0.5)), expected / 4)
    assert full(s, s.clone(), Step(y, epoch=5.0)).item() == pytest.approx(0.0, abs=1e-5)
    assert full.ce_weight == 1.0


def test_dist_matches_pearson_by_hand_and_is_zero_for_agreeing_logits():
    s, t = torch.tensor([[1.0, 0.0, 2.0], [0.5, 1.5, -1.0]]), torch.tensor([[2.0, 1.0, 0.0], [0.0, 1.0, 1.0]])

    def corr(a, b):
        ma, mb = sum(a) / len(a), sum(b) / len(b)
        cov = sum((x - ma) * (y - mb) for x, y in zip(a, b))
        return cov / math.sqrt(sum((x - ma) ** 2 for x in a) * sum((y - mb) ** 2 for y in b))

    p_s, p_t = F.softmax(s, 1).tolist(), F.softmax(t, 1).tolist()
    inter = 1 - sum(corr(a, b) for a, b in zip(p_s, p_t)) / 2
    intra = 1 - sum(corr(a, b) for a, b in zip(zip(*p_s), zip(*p_t))) / 3
    assert DIST(beta=2.0, gamma=0.5, temperature=1.0)(s, t).item() == pytest.approx(2 * inter + 0.5 * intra, rel=1e-5)
    logits = torch.randn(16, 10) * 3
    assert DIST()(logits, logits.clone()).item() == pytest.approx(0.0, abs=1e-4)


def test_logit_standardization_ignores_the_student_logits_shift_and_scale():
    torch.manual_seed(2)
    s, t = torch.randn(5, 10), torch.randn(5, 10) * 4
    y = torch.randint(0, 10, (5,))
    base_kd = lambda a, b: KD(2.0, 0.9, standardize=True)(a, b).item()
    for method in (KD(2.0, 0.9, standardize=True), DKD(warmup=0.0, standardize=True)):
        base = method(s, t, Step(y)).item()
        assert method(s * 3 + 7, t, Step(y)).item() == pytest.approx(base, rel=1e-4)
    assert KD(2.0, 0.9, standardize=True, scale=10.0)(s, t).item() == pytest.approx(10 * base_kd(s, t), rel=1e-5)
    # without standardization the student's scale matters
    assert KD(2.0, 0.9)(s * 3, t).item() != pytest.approx(KD(2.0, 0.9)(s, t).item(), rel=1e-2)


# --- feature methods --------------------------------------------------------------------------------------------------

def test_at_is_invariant_to_channel_permutations_and_zero_when_attention_agrees():
    torch.manual_seed(3)
    s, t = torch.randn(3, 8, 6, 6), torch.randn(3, 16, 6, 6)
    method = AT(probe([(8, 6, 6)], [(16, 6, 6)]))
    base = method([s], [t]).item()
    assert base > 0
    assert method([s[:, torch.randperm(8)]], [t[:, torch.randperm(16)]]).item() == pytest.approx(base, rel=1e-5)
    same = AT(probe([(16, 6, 6)], [(16, 6, 6)]))
    assert same([t * 2], [t]).item() == pytest.approx(0.0, abs=1e-6)  # the attention map is normalised


def test_at_compares_maps_of_different_sizes_and_sums_over_pairs():
    torch.manual_seed(4)
    shapes_s, shapes_t = [(8, 12, 12), (16, 6, 6)], [(32, 6, 6), (64, 3, 3)]
    method = AT(probe(shapes_s, shapes_t))
    s = [torch.randn(2, *sh) for sh in shapes_s]
    t = [torch.randn(2, *sh) for sh in shapes_t]
    pairs = [AT(probe([a], [b]))([x], [y]) for a, b, x, y in zip(shapes_s, shapes_t, s, t)]
    torch.testing.assert_close(method(s, t), sum(pairs))


def test_rkd_is_invariant_to_uniform_scaling_and_zero_for_identical_embeddings():
    torch.manual_seed(5)
    s, t = torch.randn(8, 16), torch.randn(8, 32)
    method = RKD(probe([(16,)], [(32,)]))
    base = method([s], [t]).item()
    assert base > 0
    assert method([s * 5.0], [t * 0.1]).item() == pytest.approx(base, rel=1e-4)
    assert method([t.clone()], [t]).item() == pytest.approx(0.0, abs=1e-5)
    maps = RKD(probe([(16, 2, 2)], [(32, 1, 1)]))  # maps are averaged over space first
    spread = s[:, :, None, None].expand(8, 16, 2, 2)
    assert maps([spread], [t[:, :, None, None]]).item() == pytest.approx(base, rel=1e-5)


def test_crd_loss_falls_when_student_and_teacher_embeddings_agree():
    torch.manual_seed(6)
    n, dim = 64, 16
    features = F.normalize(torch.randn(n, dim), dim=1)

    def loss_for(student_features):
        method = CRD(probe([(dim,)], [(dim,)], num_samples=n), feat_dim=dim, nce_k=32)
        with torch.no_grad():  # identical, identity heads and banks holding every sample's own embedding
            for head in (method.embed_s, method.embed_t):
                head.weight.copy_(torch.eye(dim))
                head.bias.zero_()
            method.memory_s.copy_(F.normalize(student_features, dim=1))
            method.memory_t.copy_(features)
        index = torch.arange(16)
        return method.eval()([student_features[index]], [features[index]], Step(torch.zeros(16), index)).item()

    agree = loss_for(features.clone())
    disagree = loss_for(features[torch.randperm(n)])
    assert agree < disagree


def test_crd_updates_its_memory_bank_and_needs_indices():
    torch.manual_seed(7)
    method = CRD(probe([(8,)], [(12,)], num_samples=50), feat_dim=4, nce_k=10).train()
    before = method.memory_s.clone()
    index = torch.tensor([3, 7])
    method([torch.randn(2, 8)], [torch.randn(2, 12)], Step(torch.zeros(2), index))
    changed = (method.memory_s != before).any(1)
    assert changed[index].all() and changed.sum() == 2
    assert torch.allclose(method.memory_s[index].norm(dim=1), torch.ones(2))
    with pytest.raises(Exception, match="indices"):
        method([torch.randn(2, 8)], [torch.randn(2, 12)], Step(torch.zeros(2)))


def test_crd_keeps_its_partition_constants_across_a_checkpoint():
    torch.manual_seed(9)
    first = CRD(probe([(8,)], [(12,)], num_samples=50), feat_dim=4, nce_k=10).train()
    step = Step(torch.zeros(2), torch.tensor([1, 2]))
    first([torch.randn(2, 8)], [torch.randn(2, 12)], step)
    assert (first.z > 0).all()
    resumed = CRD(probe([(8,)], [(12,)], num_samples=50), feat_dim=4, nce_k=10).train()
    resumed.load_state_dict(first.state_dict())
    resumed([torch.randn(2, 8) * 5], [torch.randn(2, 12) * 5], step)
    assert torch.equal(resumed.z, first.z)  # estimated once, on the first batch, then fixed


def test_reviewkd_fuses_levels_into_teacher_shapes_and_hcl_reduces_to_mse_on_1x1_maps():
    torch.manual_seed(8)
    shapes_s, shapes_t = [(8, 8, 8), (16, 4, 4), (32, 1, 1)], [(16, 8, 8), (32, 4, 4), (64, 1, 1)]
    method = ReviewKD(probe(shapes_s, shapes_t), mid_channels=8)
    s = [torch.randn(2, *sh) for sh in shapes_s]
    t = [torch.randn(2, *sh) for sh in shapes_t]
    assert method(s, t).item() > 0
    out, _ = method.fusions[0](s[0], torch.randn(2, 8, 4, 4))
    assert tuple(out.shape[1:]) == shapes_t[0]
    a, b = torch.randn(2, 5, 1, 1), torch.randn(2, 5, 1, 1)
    torch.testing.assert_close(hcl(a, b), F.mse_loss(a, b))
    a, b = torch.randn(2, 5, 8, 8), torch.randn(2, 5, 8, 8)
    pooled = [F.mse_loss(F.adaptive_avg_pool2d(a, k), F.adaptive_avg_pool2d(b, k)) for k in (4, 2, 1)]
    expected = (F.mse_loss(a, b) + pooled[0] / 2 + pooled[1] / 4 + pooled[2] / 8) / (1 + 1 / 2 + 1 / 4 + 1 / 8)
    torch.testing.assert_close(hcl(a, b), expected)


# --- every method through the Distiller -------------------------------------------------------------------------------

METHOD_STAGES = {
    "kd": {"logit": {"name": "kd"}},
    "kd_standardized": {"logit": {"name": "kd", "standardize": True}},
    "dkd": {"logit": {"name": "dkd", "warmup": 1.0}},
    "dist": {"logit": {"name": "dist"}},
    "fitnets": {"features": [{"name": "fitnets", "student": "stages.1", "teacher": "layer2"}]},
    "at": {"features": [{"name": "at", "student": ["stages.1", "stages.2"], "teacher": ["layer2", "layer3"]}]},
    "rkd": {"features": [{"name": "rkd", "student": "pool", "teacher": "avgpool"}]},
    "crd": {"features": [{"name": "crd", "student": "pool", "teacher": "avgpool", "nce_k": 16}]},
    "reviewkd": {"features": [{"name": "reviewkd", "student": ["stages.1", "stages.2", "pool"],
                               "teacher": ["layer2", "layer3", "avgpool"], "mid_channels": 8}]},
}


def test_every_registered_method_has_a_gradient_test():
    covered = {spec.get("logit", {}).get("name") for spec in METHOD_STAGES.values()}
    covered |= {f["name"] for spec in METHOD_STAGES.values() for f in spec.get("features", [])}
    shipped = {n for reg in (LOGIT_LOSSES, FEATURE_LOSSES) for n in reg.names()
               if reg.get(n, "").__module__.startswith("kd.train.losses.")}  # not the ones other tests register
    assert len(shipped) == 8 and shipped <= covered


@pytest.mark.parametrize("name", METHOD_STAGES)
def test_every_method_is_nonzero_and_its_gradient_reaches_the_student_and_its_modules(name, teacher_student):
    teacher, student = teacher_student
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    stage = from_dict(StageConfig, {"name": name, **METHOD_STAGES[name]})
    distiller = Distiller.build(stage, student, teacher, x[:2], 0.0, "stages[0]", num_samples=100).train()
    _, terms = distiller(Batch(x, y, torch.arange(8)), epoch=100.0)  # past any warm-up
    (term,) = [k for k in terms if k not in ("ce", "loss")]
    assert terms[term].item() > 0
    distiller.zero_grad(set_to_none=True)
    terms[term].backward()
    grad = student.stages[0][0][0].weight.grad
    assert grad is not None and grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    for p in distiller.features.parameters():  # a method's own modules learn from its term
        assert p.grad is not None, name


@pytest.mark.parametrize("name", METHOD_STAGES)
def test_every_method_trains_without_reading_a_value_on_the_host(name, teacher_student):
    """What a step captured in a CUDA graph needs (kd/train/step.py): after a first eager step, forward and backward run
    on `meta` tensors, which hold no values, so any read on the host (`.item()`, `min()` on a tensor, a
    tensor-dependent `if`) fails here. DKD's warm-up did, through `min(step.epoch / warmup, 1.0)`."""
    teacher, student = teacher_student
    x, y = torch.randn(8, 1, 28, 28), torch.randint(0, 10, (8,))
    stage = from_dict(StageConfig, {"name": name, **METHOD_STAGES[name]})
    distiller = Distiller.build(stage, student, teacher, x[:2], 0.0, "stages[0]", num_samples=100).train()
    distiller(Batch(x, y, torch.arange(8)), epoch=torch.tensor(0.5))  # the eager warm-up (CRD's first step reads)
    meta = [t.to("meta") for t in (x, y, torch.arange(8), torch.tensor(0), torch.tensor(0.5))]
    _, terms = distiller.to("meta")(Batch(*meta[:4]), epoch=meta[4])
    terms["loss"].backward()
    assert terms["loss"].device.type == "meta"


@pytest.mark.parametrize("method, params, expected", [
    ("dkd", {"beta": -1.0}, "logit loss 'dkd': beta must be >= 0, got -1.0"),
    ("dkd", {"temperature": 0.0}, "logit loss 'dkd': temperature must be in (0, 100.0], got 0.0"),
    ("dkd", {"betta": 8}, "betta: unknown key (did you mean 'beta'?"),
    ("dist", {"gamma": -2.0}, "logit loss 'dist': gamma must be >= 0, got -2.0"),
    ("dist", {"temprature": 4}, "temprature: unknown key (did you mean 'temperature'?"),
    ("kd", {"standardize": "yes"}, "standardize: expected bool, got 'yes'"),
    ("kd", {"scale": -1.0}, "logit loss 'kd': scale must be >= 0, got -1.0"),
])
def test_logit_method_parameters_are_checked(method, params, expected):
    with pytest.raises(ConfigError) as e:
        LOGIT_LOSSES.build(method, "stages[1].logit", dict(params))
    assert str(e.value).startswith("stages[1].logit"), str(e.value)
    assert expected in str(e.value)


@pytest.mark.parametrize("feature, expected", [
    ({"name": "at", "student": "stages.1", "teacher": "layer2", "p": 0.0}, "feature loss 'at': p must be > 0"),
    ({"name": "rkd", "student": "pool", "teacher": "avgpool", "angle_weight": -1.0}, "weights must be >= 0"),
    ({"name": "crd", "student": "pool", "teacher": "avgpool"},
     "feature loss 'crd': nce_k must be in [1, training images=100), got 16384"),
    ({"name": "reviewkd", "student": ["stages.1"], "teacher": ["layer2"], "mid_channels": 0},
     "mid_channels must be >= 1"),
    ({"name": "fitnets", "student": ["stages.1", "stages.2"], "teacher": ["layer2", "layer3"]},
     "'fitnets' matches 1 student and teacher layer(s); got 2 and 2"),
    ({"name": "reviewkd", "student": ["stages.1", "stages.2"], "teacher": ["layer2"]},
     "'reviewkd' matches the same number of student and teacher layer(s); got 2 and 1"),
    ({"name": "at", "student": "fc", "teacher": "fc"}, "at needs 4-D feature maps"),
    ({"name": "rkd", "student": "pool", "teacher": "avgpool", "distance": 25}, "distance: unknown key (did you mean"),
    ({"name": "fitnets", "student": "stages.1", "teacher": "layer9"}, "teacher: no layer 'layer9' in this model"),
])
def test_feature_method_configs_are_checked(feature, expected, teacher_student):
    teacher, student = teacher_student
    stage = from_dict(StageConfig, {"name": "s", "features": [feature]})
    with pytest.raises(ConfigError) as e:
        Distiller.build(stage, student, teacher, torch.randn(2, 1, 28, 28), 0.0, "stages[1]", num_samples=100)
    assert str(e.value).startswith("stages[1].features[0]"), str(e.value)
    assert expected in str(e.value)
