"""Models, pretrained-weight loading, and the inference-cost measurements."""
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from kd.config import EvalConfig, load_config
from kd.errors import ConfigError
from kd.measure.evaluate import LiveTensorBytes, macs_per_image, peak_memory, profile
from kd.train.models import count_parameters, create_model, load_weights

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
CPU = torch.device("cpu")


# the smoke test, and the literature's ResNet-34 -> ResNet-18 benchmark pair (2x, compared with published figures)
@pytest.mark.parametrize("path", [p for p in CONFIGS if p.name not in ("smoke.yaml", "imagenet_r34_r18.yaml")],
                         ids=lambda p: p.name)
def test_shipped_students_are_at_least_10x_cheaper_than_the_teacher(path, dataset_shapes):
    cfg = load_config(path)
    c, size, classes = dataset_shapes[cfg.data.dataset]
    if cfg.data.dataset == "imagenet":  # ImageNet-style data at the config's size and class count (Tiny-ImageNet)
        size, classes = cfg.data.image_size, cfg.data.classes or classes
    teacher = create_model(cfg.teacher.name, "teacher", cfg.teacher.kwargs, c, classes, size)
    student = create_model(cfg.student.name, "student", cfg.student.kwargs, c, classes, size)
    assert count_parameters(teacher) >= 10 * count_parameters(student)
    assert macs_per_image(teacher, (c, size, size), CPU) >= 10 * macs_per_image(student, (c, size, size), CPU)


def test_macs_count_a_known_layer_exactly():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False)
    assert macs_per_image(conv, (3, 10, 10), CPU) == 10 * 10 * 8 * 3 * 3 * 3


def test_small_image_resnet_keeps_resolution_and_large_one_downsamples():
    small = create_model("resnet18", "t", {}, 1, 10, 28)
    assert small.conv1.kernel_size == (3, 3) and isinstance(small.maxpool, nn.Identity)
    assert small(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    large = create_model("resnet18", "t", {}, 3, 5, 224)
    assert large.conv1.kernel_size == (7, 7) and large(torch.randn(1, 3, 224, 224)).shape == (1, 5)


def test_a_stride_2_stem_halves_every_stage_of_a_small_image_resnet_and_is_refused_for_large_images():
    full, quick = (create_model("resnet18", "t", {"stem_stride": s}, 1, 10, 28) for s in (1, 2))
    assert count_parameters(full) == count_parameters(quick)
    shapes = lambda m: [m.layer1(m.relu(m.bn1(m.conv1(torch.randn(1, 1, 28, 28))))).shape[-1]]
    assert shapes(full) == [28] and shapes(quick) == [14]
    assert 3.5 < macs_per_image(full, (1, 28, 28), CPU) / macs_per_image(quick, (1, 28, 28), CPU) < 4.5
    with pytest.raises(ConfigError, match="stem_stride"):
        create_model("resnet18", "t", {"stem_stride": 2}, 3, 5, 224)


def test_torchvision_classifiers_by_name_and_their_channel_check():
    model = create_model("mobilenet_v3_small", "student", {}, 3, 7, 64)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    with pytest.raises(ConfigError, match="needs 3-channel images"):
        create_model("mobilenet_v3_small", "student", {}, 1, 7, 28)


def test_live_tensor_bytes_sees_the_activation_peak_of_a_known_chain():
    chain = nn.Sequential(nn.Linear(1000, 1000), nn.ReLU(inplace=True), nn.Linear(1000, 10))
    x, tracker = torch.randn(100, 1000), LiveTensorBytes()
    with torch.inference_mode(), tracker:
        chain(x)
    # the 100x1000 hidden activation (ReLU in place) plus the 100x10 output, in fp32
    assert tracker.peak == 4 * (100 * 1000 + 100 * 10)
    assert tracker.current == 0


def test_peak_memory_grows_with_batch_and_includes_weights():
    model = create_model("cnn", "s", {"channels": [8, 16]}, 1, 10, 28)
    weights = sum(p.numel() * 4 for p in model.parameters())
    small, big = peak_memory(model, torch.randn(1, 1, 28, 28)), peak_memory(model, torch.randn(64, 1, 28, 28))
    assert weights < small < big
    assert big - weights > 64 * 8 * 28 * 28 * 4  # at least one full first-layer activation


def test_profile_reports_every_cost_figure():
    model = create_model("cnn", "s", {"channels": [8, 16]}, 1, 10, 28)
    out = profile(model, (1, 28, 28), CPU, EvalConfig(batch_size=8, warmup=1, repeats=3))
    assert out["params"] == count_parameters(model)
    assert out["param_bytes"] == 4 * out["params"]
    for key in ("latency_b1_ms", "latency_b8_ms", "images_per_s_b8", "peak_memory_bytes", "macs"):
        assert out[key] > 0
    assert out["latency_b8_p90_ms"] >= out["latency_b8_ms"]
    assert out["images_per_s_b8"] == pytest.approx(8000 / out["latency_b8_ms"])


def test_local_state_dict_initialises_all_matching_tensors(tmp_path):
    source = create_model("resnet18", "t", {}, 3, 1000, 224)
    torch.save(source.state_dict(), tmp_path / "w.pt")
    target = create_model("resnet18", "t", {}, 3, 10, 224)
    fresh = load_weights(target, "resnet18", str(tmp_path / "w.pt"), "teacher.weights")
    assert fresh == ["fc.bias", "fc.weight"]
    assert torch.equal(target.layer4[1].conv2.weight, source.layer4[1].conv2.weight)


def test_torchvision_pretrained_path_reads_the_hub_cache(tmp_path, monkeypatch):
    """torchvision's own loader, fed from a locally saved state dict in its cache (no download)."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    weights = torchvision.models.ResNet18_Weights.DEFAULT
    source = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    torch.save(source.state_dict(), cache / weights.url.rsplit("/", 1)[-1])
    target = create_model("resnet18", "t", {}, 3, 1000, 224)
    assert load_weights(target, "resnet18", "torchvision", "teacher.weights") == []
    loaded, saved = target.state_dict(), source.state_dict()
    assert loaded.keys() == saved.keys() and all(torch.equal(loaded[k], saved[k]) for k in saved)


def test_bad_weights_give_config_errors(tmp_path, payload):
    model = create_model("resnet18", "t", {}, 3, 10, 224)
    with pytest.raises(ConfigError, match="no such file"):
        load_weights(model, "resnet18", str(tmp_path / "none.pt"), "teacher.weights")
    torch.save({"something.else": torch.zeros(1)}, tmp_path / "other.pt")
    with pytest.raises(ConfigError, match="unexpected tensors something.else"):
        load_weights(model, "resnet18", str(tmp_path / "other.pt"), "teacher.weights")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    with pytest.raises(ConfigError, match="text.pt is not a state dict this project can read"):
        load_weights(model, "resnet18", str(tmp_path / "text.pt"), "teacher.weights")
    marker = tmp_path / "ran-code"
    torch.save({"fc.weight": payload(marker)}, tmp_path / "planted.pt")
    with pytest.raises(ConfigError, match="planted.pt is not a state dict"):
        load_weights(model, "resnet18", str(tmp_path / "planted.pt"), "teacher.weights")
    assert not marker.exists()  # read as weights only: nothing in it ran
    with pytest.raises(ConfigError, match="no pretrained weights for 'cnn'"):
        load_weights(create_model("cnn", "s", {}, 3, 10, 32), "cnn", "torchvision", "student.weights")
