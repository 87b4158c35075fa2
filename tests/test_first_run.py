"""A new user's first runs: the precision fits the machine, every mistake in a model or method stops the run before
the long work with one line, and a teacher checkpoint is only used for the data and recipe that made it."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import run
from kd.config import TrainConfig, load_config
from kd.data.datasets import DATASETS, Splits
from kd.device import amp_reason, resolve_amp
from kd.errors import ConfigError
from kd.log import Progress
from kd.measure.evaluate import accuracy
from kd.train.distiller import Distiller
from kd.train.models import create_model

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


# --- amp: auto --------------------------------------------------------------------------------------------------------

def cpu_flags():
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    return set(next(line for line in text.splitlines() if line.startswith("flags")).split(":", 1)[1].split())


def test_auto_precision_is_bf16_only_where_this_cpu_runs_it_natively():
    amp, why = resolve_amp("auto", torch.device("cpu")), amp_reason("auto", torch.device("cpu"))
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX2", "DEFAULT"):  # no AVX-512 at all: no AVX512-BF16, no AMX
        assert amp == "off", why
    flags = cpu_flags()
    if flags is not None:
        assert (amp == "bf16") == bool({"avx512_bf16", "amx_bf16"} & flags), (capability, why)
    assert capability in why


def test_auto_precision_follows_the_hardware_and_explicit_choices_pass_through(monkeypatch):
    import kd.device
    cpu = torch.device("cpu")
    monkeypatch.setattr(kd.device, "native_bf16", lambda device: True)
    assert resolve_amp("auto", cpu) == "bf16"
    monkeypatch.setattr(kd.device, "native_bf16", lambda device: False)
    assert resolve_amp("auto", cpu) == "off"
    assert [resolve_amp(a, cpu) for a in ("off", "bf16")] == ["off", "bf16"]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_shipped_configs_choose_precision_per_machine(path):
    cfg = load_config(path)
    assert TrainConfig().amp == "auto"
    assert cfg.train.amp == "auto" and cfg.teacher.train.amp == "auto"


@pytest.mark.slow
def test_run_says_which_precision_it_chose_and_why(smoke_config, capsys):
    assert run.main(["--config", str(smoke_config(stages=[{"name": "baseline"}])), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    amp = resolve_amp("auto", torch.device("cpu"))
    assert f"[precision] teacher.train.amp and train.amp: auto -> {'fp32' if amp == 'off' else amp} (" in out


# --- mistakes in a user's model or method: one line before the teacher trains -----------------------------------------

PLUGIN = '''
import torch
import torch.nn.functional as F
from torch import nn

from kd.train.losses import LOGIT_LOSSES
from kd.train.models import MODELS


@MODELS.register("broken_student")
class BrokenStudent(nn.Module):
    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.fc = nn.Linear(in_channels, num_classes)

    def forward(self, x):
        return self.fc(x)  # forgets to pool: (N, C, H, W) meets a Linear of C inputs


@LOGIT_LOSSES.register("no_ce_weight")
class NoCEWeight(nn.Module):
    def forward(self, student_logits, teacher_logits, step=None):
        return F.mse_loss(student_logits, teacher_logits)


@LOGIT_LOSSES.register("wrong_signature")
class WrongSignature(nn.Module):
    ce_weight = 0.5

    def forward(self, student_logits, teacher_logits):
        return F.mse_loss(student_logits, teacher_logits)


@LOGIT_LOSSES.register("per_sample")
class PerSample(nn.Module):
    ce_weight = 0.5

    def forward(self, student_logits, teacher_logits, step=None):
        return (student_logits - teacher_logits).pow(2).mean(1)


@LOGIT_LOSSES.register("untyped")
class Untyped(nn.Module):
    def __init__(self, temperature=4.0):
        super().__init__()
        self.temperature, self.ce_weight = temperature, 0.5

    def forward(self, student_logits, teacher_logits, step=None):
        return F.mse_loss(student_logits / self.temperature, teacher_logits / self.temperature)
'''

def line_of(text):
    return f"broken_plugin.py:{PLUGIN.splitlines().index(text) + 1}"


BROKEN = [
    ({"student": {"name": "broken_student", "kwargs": {}}, "stages": [{"name": "baseline"}]},
     "student: a training step on 4 validation images failed: RuntimeError",
     line_of("        return self.fc(x)  # forgets to pool: (N, C, H, W) meets a Linear of C inputs")),
    ({"stages": [{"name": "s", "logit": {"name": "no_ce_weight"}}]},
     "stages[0].logit: logit method 'no_ce_weight' must be an nn.Module with a numeric ce_weight", None),
    ({"stages": [{"name": "s", "logit": {"name": "wrong_signature"}}]},
     "stages[0].logit: a training step on 4 validation images failed: TypeError", None),
    ({"stages": [{"name": "s", "logit": {"name": "per_sample"}}]},
     "stages[0].logit: the loss must be one scalar tensor (see kd/train/losses/base.py), got a tensor of shape (4,)",
     None),
    ({"stages": [{"name": "baseline"}, {"name": "s", "logit": {"name": "untyped", "temperature": "4"}}]},
     "stages[1].logit: a training step on 4 validation images failed: TypeError",
     line_of("        return F.mse_loss(student_logits / self.temperature, teacher_logits / self.temperature)")),
]


@pytest.fixture(scope="module")
def broken_plugin(tmp_path_factory):
    """One file for the module: a process imports a plugin file once, and registers each name once."""
    path = tmp_path_factory.mktemp("plugin") / "broken_plugin.py"
    path.write_text(PLUGIN)
    return str(path)


@pytest.mark.parametrize("changes, message, where", BROKEN, ids=[
    "student_forward_fails", "no_ce_weight", "wrong_forward_signature", "per_sample_loss", "string_for_a_float"])
def test_a_broken_plugin_stops_the_run_before_the_teacher_trains(smoke_config, broken_plugin, tmp_path, one_error_line,
                                                                  changes, message, where):
    cfg = smoke_config(plugins=[broken_plugin], **changes)
    err = one_error_line.study(cfg)
    assert err.startswith(f"error: {cfg}: {message}"), err
    if where:
        assert err.endswith(f"{where})"), err
    assert not (tmp_path / "teacher.pt").exists() and not (tmp_path / "runs" / "smoke" / "teacher").exists()


@pytest.mark.slow
def test_the_check_covers_every_seed_and_leaves_no_trace_in_the_run(smoke_config, monkeypatch, assert_same_training):
    """Each (stage, seed) distiller is tried once before training; the trained weights equal those of a run
    without the check (the dry step restores what it touched)."""
    import kd.study.students
    import kd.study.teacher
    stages = [{"name": "crd", "features": [{"name": "crd", "student": "pool", "teacher": "avgpool", "nce_k": 16}]}]
    cfg = smoke_config(seeds=[0, 1], stages=stages)
    tried = []
    dry_step = kd.study.teacher.dry_step
    record = lambda d, *a, **k: tried.append(k.get("student_key")) or dry_step(d, *a, **k)
    monkeypatch.setattr(kd.study.teacher, "dry_step", record)
    monkeypatch.setattr(kd.study.students, "dry_step", record)
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    assert tried == ["teacher", None, None]
    monkeypatch.setattr(kd.study.study.Study, "check", lambda self: None)
    unchecked_cfg = smoke_config(seeds=[0, 1], stages=stages, name="unchecked")
    assert run.main(["--config", str(unchecked_cfg), "--device", "cpu"]) == 0
    runs = cfg.parent / "runs"
    for seed in ("seed0", "seed1"):
        assert_same_training(runs / "smoke" / "crd" / seed, runs / "unchecked" / "crd" / seed)


def test_dry_passes_run_on_the_device_each_model_lives_on():
    """A student's connectors are sized with the teacher already on another device (on a GPU, the second seed of
    a feature stage): each model gets the sample on its own device. `meta` stands in for the GPU."""
    from kd.config import FeatureConfig, StageConfig
    teacher = create_model("resnet18", "teacher", {}, 3, 10, 16).to("meta")
    student = create_model("cnn", "student", {"channels": [8, 16, 32], "blocks": 1}, 3, 10, 16)
    stage = StageConfig("f", features=[FeatureConfig("fitnets", student=["stages.1"], teacher=["layer2"])])
    distiller = Distiller.build(stage, student, teacher, torch.randn(2, 3, 16, 16), 0.0, "stages[0]")
    assert distiller.features[0].connector.proj[0].out_channels == 128  # layer2 of the teacher on `meta`


# --- teacher provenance -----------------------------------------------------------------------------------------------

class Images(torch.utils.data.Dataset):
    def __init__(self, data, targets):
        self.data, self.targets = data, targets

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, i):
        return self.data[i][None].float() / 255, int(self.targets[i])


def tensor_file(cfg):
    """Grey 16x16 images and labels from `<root>/data.pt`: a dataset whose content depends on where it lies."""
    blob = torch.load(Path(cfg.root) / "data.pt")
    train, test = Images(blob["x"][:200], blob["y"][:200]), Images(blob["x"][200:], blob["y"][200:])
    return Splits(train, train, test, 10, 1, 16, (0.5,), (0.25,))


def write_images(folder, seed):
    g = torch.Generator().manual_seed(seed)
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"x": torch.randint(0, 256, (264, 16, 16), dtype=torch.uint8, generator=g),
                "y": torch.randint(0, 10, (264,), generator=g)}, folder / "data.pt")
    return str(folder)


@pytest.fixture
def provenance_config(smoke_config, tmp_path, monkeypatch):
    monkeypatch.setitem(DATASETS._items, "test_tensor_file", tensor_file)  # registered for this test only

    def write(root=None, test_subset=None, **changes):
        return smoke_config(data={"dataset": "test_tensor_file", "root": root or write_images(tmp_path / "a", 0),
                                  "val_size": 32, "train_subset": None, "test_subset": test_subset},
                            stages=[{"name": "kd", "logit": {"name": "kd"}}], **changes)
    return write


@pytest.mark.slow
def test_a_teacher_made_under_another_recipe_is_refused(provenance_config, capsys, one_error_line):
    cfg = provenance_config()
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    teacher = cfg.parent / "teacher.pt"
    before = teacher.read_bytes()
    capsys.readouterr()
    err = one_error_line.study(cfg, "--set", "teacher.train.epochs=2", "--set", "teacher.train.lr=0.01")
    assert f"teacher.checkpoint: {teacher} was made under another config (" in err
    assert "teacher.train.epochs: 1 -> 2" in err and "teacher.train.lr: 0.05 -> 0.01" in err
    assert "teacher.accept_checkpoint: true" in err and teacher.read_bytes() == before


@pytest.mark.slow
def test_a_teacher_made_from_other_images_is_refused_and_a_moved_copy_of_the_same_is_not(provenance_config, tmp_path,
                                                                                         one_error_line):
    cfg = provenance_config()
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    other = write_images(tmp_path / "b", seed=1)  # same classes, same shapes, other images
    err = one_error_line.study(provenance_config(root=other, name="other"))
    assert "was made under another config (data.content: " in err
    moved = tmp_path / "moved"
    (moved).mkdir()
    (moved / "data.pt").write_bytes((tmp_path / "a" / "data.pt").read_bytes())
    assert run.main(["--config", str(provenance_config(root=str(moved), name="moved")), "--device", "cpu"]) == 0


@pytest.mark.slow
def test_a_smaller_test_split_keeps_the_teacher_and_measures_it_again(provenance_config, capsys, one_error_line):
    """The test split changes what is reported, not what the teacher learnt."""
    cfg = provenance_config()
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    capsys.readouterr()
    assert "finished under a different config (data.test_subset: None -> 16)" in \
        one_error_line.study(cfg, "--set", "data.test_subset=16")
    report = json.loads((cfg.parent / "runs" / "smoke" / "teacher" / "result.json").read_text())
    assert report["fingerprint"] and report["checkpoint"] == str(cfg.parent / "teacher.pt")
    again = provenance_config(name="small_test", test_subset=16)
    assert run.main(["--config", str(again), "--device", "cpu"]) == 0
    assert "[teacher] test top-1" in capsys.readouterr().out  # re-measured on the new split, not retrained


@pytest.mark.slow
def test_a_teacher_without_provenance_is_refused_unless_accepted_and_then_the_report_says_so(provenance_config, capsys,
                                                                                            one_error_line):
    cfg = provenance_config()
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    teacher = cfg.parent / "teacher.pt"
    ckpt = torch.load(teacher, weights_only=True)
    del ckpt["identity"], ckpt["digest"]  # as another tool writes a teacher: weights only
    torch.save(ckpt, teacher)
    capsys.readouterr()
    err = one_error_line.study(provenance_config(name="again"))
    assert "records no provenance" in err and "teacher.accept_checkpoint: true" in err
    accepted = provenance_config(name="accepted", teacher={"accept_checkpoint": True})
    assert run.main(["--config", str(accepted), "--device", "cpu"]) == 0
    report = json.loads((cfg.parent / "runs" / "accepted" / "report.json").read_text())
    assert "records no provenance" in report["meta"]["teacher_note"]
    assert "teacher checkpoint was used although it records no provenance" in \
        (cfg.parent / "runs" / "accepted" / "report.md").read_text()


def test_a_pretrained_teacher_with_a_new_head_needs_training_epochs(smoke_config, tmp_path, one_error_line):
    weights = tmp_path / "five_classes.pt"
    torch.save(create_model("resnet18", "teacher", {}, 3, 5, 16).state_dict(), weights)
    cfg = smoke_config(teacher={"weights": str(weights), "train": {"epochs": 0}}, stages=[{"name": "baseline"}])
    err = one_error_line.study(cfg)
    assert "teacher.train.epochs: 0 leaves tensors that" in err and "fc.bias, fc.weight" in err
    assert not (tmp_path / "teacher.pt").exists()


# --- models, metrics, output ------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_a_teacher_with_no_epochs_weights_or_checkpoint_is_refused_before_anything_runs(smoke_config, tmp_path,
                                                                                         one_error_line):
    cfg = smoke_config(teacher={"train": {"epochs": 0}})
    err = one_error_line.study(cfg)
    assert "teacher.train.epochs: 0, with no checkpoint at" in err and "distil from noise" in err, err
    assert not (tmp_path / "runs").exists() and not (tmp_path / "teacher.pt").exists()
    only_labels = smoke_config(teacher={"train": {"epochs": 0}}, stages=[{"name": "baseline"}])
    assert run.main(["--config", str(only_labels), "--device", "cpu"]) == 0  # nothing distils from it


def test_torchvision_model_kwargs_are_checked_like_ours():
    with pytest.raises(ConfigError, match=r"student.kwargs.dropuot: unknown key \(did you mean 'dropout'\?"):
        create_model("mobilenet_v3_small", "student", {"dropuot": 0.5}, 3, 10, 32)
    with pytest.raises(ConfigError, match=r"student.kwargs.channels: unknown key"):  # a cnn's kwargs after a rename
        create_model("mobilenet_v3_small", "student", {"channels": [1, 2]}, 3, 10, 32)
    with pytest.raises(ConfigError, match=r"student.kwargs.dropout: expected float, got 'x'"):
        create_model("mobilenet_v3_small", "student", {"dropout": "x"}, 3, 10, 32)
    model = create_model("mobilenet_v3_small", "student", {"dropout": 0.3}, 3, 10, 32)
    assert model.classifier[2].p == 0.3


def test_top5_is_not_reported_with_five_classes_or_fewer():
    x, y = torch.randn(8, 4), torch.randint(0, 3, (8,))
    few = accuracy(torch.nn.Identity(), [(x[:, :3], y)], torch.device("cpu"))
    many = accuracy(torch.nn.Identity(), [(torch.randn(8, 6), y)], torch.device("cpu"))
    assert few["top5"] is None and 0 <= many["top5"] <= 1


def test_progress_prints_a_line_now_and_then_when_output_is_not_a_terminal(capsys):
    items = list(Progress(range(3), "[stage] epoch 1/1", every=0.0))
    assert items == [0, 1, 2]
    out = capsys.readouterr().out.splitlines()
    assert [line.split(" in ")[0] for line in out] == [f"[stage] epoch 1/1: {k}/3" for k in (1, 2, 3)]
    assert all(" it/s)" in line for line in out)


@pytest.mark.slow
def test_bench_on_a_dataset_the_cache_cannot_serve_names_the_dataset_not_cache_mode(smoke_config, tmp_path,
                                                                                    one_error_line):
    cfg = smoke_config(data={"pipeline": "loader"})
    (tmp_path / "teacher.pt").write_bytes(b"")  # bench needs an existing teacher; it stops before reading it
    proc = subprocess.run([sys.executable, str(ROOT / "bench.py"), "--config", str(cfg), "--device", "cpu"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    err = one_error_line.process(proc)
    assert "cache.mode" not in err and "data.pipeline" in err, err
