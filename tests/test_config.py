"""Config validation: kd.config.load_config on YAML files, the methods' own parameters, and run.main's error line."""
import copy

import pytest
import yaml

from kd.config import load_config
from kd.errors import ConfigError, KDError
from kd.train.losses import LOGIT_LOSSES

MINIMAL = {"name": "study", "stages": [{"name": "baseline"}]}


def merged(base, updates):
    """A deep copy of `base` with nested mappings in `updates` merged in (a value of None removes the key)."""
    out = copy.deepcopy(base)
    for k, v in updates.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merged(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def write_config(tmp_path, updates=None, base=MINIMAL, name="study.yaml"):
    path = tmp_path / name
    path.write_text(yaml.safe_dump(merged(base, updates or {}), sort_keys=False))
    return path


def load_error(path, overrides=()):
    with pytest.raises(KDError) as e:
        load_config(path, overrides)
    return str(e.value)


def cli_error(one_error_line, path, *sets):
    """run.main on `path` with `--set` for each of `sets`: exit code 2 and one 'error: ' line on stderr; returns it."""
    return one_error_line.cli("--config", path, *[a for s in sets for a in ("--set", s)])


# --- load_config: keys, types and values ------------------------------------------------------------------------------

def test_minimal_config_loads_with_defaults(tmp_path):
    cfg = load_config(write_config(tmp_path))
    assert cfg.name == "study" and [s.name for s in cfg.stages] == ["baseline"]
    assert not cfg.stages[0].uses_teacher
    assert (cfg.train.epochs, cfg.train.lr, cfg.data.dataset, cfg.student.name) == (10, 0.05, "fashion_mnist", "cnn")


def test_method_parameters_sit_beside_the_name(tmp_path):
    stage = {"name": "kd", "logit": {"name": "kd", "temperature": 2, "alpha": 0.5},
             "features": [{"name": "fitnets", "student": "stages.1", "teacher": "layer2", "weight": 0.5}]}
    cfg = load_config(write_config(tmp_path, {"stages": [stage]}))
    (s,) = cfg.stages
    assert (s.logit.name, s.logit.params) == ("kd", {"temperature": 2, "alpha": 0.5})
    f = s.features[0]
    assert (f.name, f.student, f.teacher, f.weight, f.params) == ("fitnets", ["stages.1"], ["layer2"], 0.5, {})


@pytest.mark.parametrize("updates, expected", [
    pytest.param({"trian": {"epochs": 1}}, "trian: unknown key (did you mean 'train'? choose from: cache, data, ",
                 id="top-typo"),
    pytest.param({"train": {"lr_rate": 0.1}}, "train.lr_rate: unknown key (choose from: amp, ", id="nested-unknown"),
    pytest.param({"data": {"augment": {"hflips": False}}}, "data.augment.hflips: unknown key (did you mean 'hflip'?",
                 id="deep-typo"),
    pytest.param({"train": {"epochs": "ten"}}, "train.epochs: expected int, got 'ten'", id="str-for-int"),
    pytest.param({"train": {"epochs": True}}, "train.epochs: expected int, got True", id="bool-for-int"),
    pytest.param({"train": {"epochs": 2.5}}, "train.epochs: expected int, got 2.5", id="float-for-int"),
    pytest.param({"train": {"lr": "fast"}}, "train.lr: expected float, got 'fast'", id="str-for-float"),
    pytest.param({"train": {"milestones": 3}}, "train.milestones: expected a list, got 3", id="int-for-list"),
    pytest.param({"train": 5}, "train: expected a mapping, got 5", id="int-for-section"),
    pytest.param({"train": {"lr": -0.1}}, "train.lr: must be in (0, 100.0], got -0.1", id="negative-lr"),
    pytest.param({"teacher": {"train": {"lr": 0}}}, "teacher.train.lr: must be in (0, 100.0], got 0.0",
                 id="zero-teacher-lr"),
    pytest.param({"train": {"schedule": "cos"}},
                 "train.schedule: unknown value 'cos' (did you mean 'cosine'? choose from: constant, cosine, onecycle, "
                 "step)",
                 id="schedule"),
    pytest.param({"train": {"optimizer": "adam"}},
                 "train.optimizer: unknown value 'adam' (did you mean 'adamw'? choose from: adamw, sgd)",
                 id="optimizer"),
    pytest.param({"teacher": {"train": {"compile": "reduce_overhead"}}},
                 "teacher.train.compile: unknown value 'reduce_overhead' (did you mean 'reduce-overhead'?",
                 id="compile"),
    pytest.param({"train": {"epochs": 4, "warmup_epochs": 5}}, "train.warmup_epochs: must be in [0, epochs=4], got 5.0",
                 id="warmup"),
    pytest.param({"data": {"val_size": 0}}, "data.val_size: must be >= 1, got 0", id="val-size"),
    pytest.param({"name": None}, "config: missing required key(s): name", id="no-name"),
    pytest.param({"stages": []}, "stages: must list at least one student stage", id="no-stages"),
    pytest.param({"stages": [{"name": "a"}, {"name": "a"}]}, "stages[0].name: must be a unique plain folder name",
                 id="dup-stage"),
    pytest.param({"stages": [{"name": "teacher"}]},
                 "stages[0].name: must be a unique plain folder name other than 'teacher'", id="stage-named-teacher"),
    pytest.param({"stages": [{"name": ".."}]}, "stages[0].name: must be a unique plain folder name", id="stage-dotdot"),
    pytest.param({"name": ".."}, "name: must be a plain folder name (no '/', not '.' or '..', printable, at most 100 "
                 "bytes), got '..'",
                 id="study-dotdot"),
    pytest.param({"train": {"lr": 1e300}}, "train.lr: must be in (0, 100.0], got 1e+300", id="astronomic-lr"),
    pytest.param({"teacher": {"train": {"epochs": 10 ** 20}}}, "teacher.train.epochs: must be in [0, 100000], got "
                 "100000000000000000000", id="endless-epochs"),
    pytest.param({"data": {"image_size": 100_000}}, "data.image_size: must be in [8, 4096], got 100000",
                 id="vast-images"),
    pytest.param({"data": {"std": []}}, "data.std: must list one value per channel, or be null, got []",
                 id="empty-std"),
    pytest.param({"data": {"mean": []}}, "data.mean: must list one value per channel, or be null, got []",
                 id="empty-mean-is-not-the-default"),
    pytest.param({"name": "run\x00one"}, "name: must be a plain folder name", id="nul-in-name"),
    pytest.param({"name": "tab\tbed"}, "name: must be a plain folder name", id="control-character-in-name"),
    pytest.param({"stages": [{"name": "ok\udc80"}]}, "stages[0].name: must be a unique plain folder name",
                 id="lone-surrogate-in-stage"),
    pytest.param({"stages": [{"name": "s" * 300}]}, "stages[0].name: must be a unique plain folder name other than "
                 "'teacher' (printable, at most 100 bytes), got 'sssss", id="name-too-long-for-a-folder"),
    pytest.param({"train": {"amp": ["x"] * 1000}}, "train.amp: expected str, got ['x', 'x', 'x', 'x', ...]",
                 id="long-value-shown-short"),
    pytest.param({"device": "cuda:abc"}, "device: must be auto, cpu, cuda or cuda:N, got 'cuda:abc'", id="device"),
    pytest.param({"data": {"num_workers": 10_000}}, "data.num_workers: must be in [0, 256]", id="workers"),
    pytest.param({"train": {"weight_decay": 1e300}}, "train.weight_decay: must be in [0, 10]", id="weight-decay"),
    pytest.param({"eval": {"repeats": 10 ** 9}}, "eval.repeats: must be in [1, 10000]", id="repeats"),
    pytest.param({"seed": -1}, "seed: must be in [0, 2**32), got -1", id="negative-seed"),
    pytest.param({"seeds": [0, 2 ** 40]}, "seeds[1]: must be in [0, 2**32), got 1099511627776", id="huge-seed"),
    pytest.param({"train": {"lr": float("inf")}}, "train.lr: expected a finite number, got inf", id="inf-lr"),
    pytest.param({"train": {"lr": float("nan")}}, "train.lr: expected a finite number, got nan", id="nan-lr"),
    pytest.param({"stages": [{"name": "kd", "logit": {"temperature": 2}}]},
                 "stages[0].logit: missing required key(s): name", id="logit-without-name"),
    pytest.param({"stages": [{"name": "f", "features": [{"name": "fitnets", "student": "stages.1"}]}]},
                 "stages[0].features[0]: needs both 'student' and 'teacher' layer names", id="feature-pair"),
])
def test_invalid_config(tmp_path, updates, expected):
    path = write_config(tmp_path, updates)
    message = load_error(path)
    assert message.startswith(f"{path}: {expected}"), message


def test_null_stages(tmp_path):
    path = tmp_path / "null.yaml"
    path.write_text("name: study\nstages: null\n")
    assert load_error(path) == f"{path}: stages: expected a list, got None"


def test_did_you_mean_ignores_case_and_never_offers_an_empty_list():
    from kd.errors import did_you_mean
    assert did_you_mean("Adamw", ["sgd", "adamw"]) == "did you mean 'adamw'? choose from: adamw, sgd"
    assert did_you_mean("x", []) == "nothing can be set here"


def test_unknown_key_lists_the_valid_ones(tmp_path):
    message = load_error(write_config(tmp_path, {"train": {"lr_rate": 0.1}}))
    assert " lr, " in message and "weight_decay)" in message


# --- --set overrides --------------------------------------------------------------------------------------------------

def test_overrides_are_parsed_as_yaml(tmp_path):
    path = write_config(tmp_path, {"stages": [{"name": "baseline"}, {"name": "kd", "logit": {"name": "kd"}}]})
    cfg = load_config(path, ["train.epochs=5", "stages.0.name=x", "stages.1.logit.temperature=2",
                             "data.train_subset=null", "train.milestones=[1, 3]"])
    assert cfg.train.epochs == 5 and isinstance(cfg.train.epochs, int)
    assert [s.name for s in cfg.stages] == ["x", "kd"]
    assert cfg.stages[1].logit.params == {"temperature": 2}
    assert cfg.data.train_subset is None and cfg.train.milestones == [1, 3]


@pytest.mark.parametrize("override, expected", [
    pytest.param("stages.3.name=x", "--set stages.3: no list item 3 (the list has 1)", id="list-index"),
    pytest.param("stages.first.name=x", "--set stages.first: no list item first (the list has 1)", id="list-word"),
    pytest.param("train.epochs", "--set: expected key=value, got 'train.epochs'", id="no-equals"),
    pytest.param("=5", "--set: expected key=value, got '=5'", id="no-key"),
    pytest.param("train.epochs=ten", "train.epochs: expected int, got 'ten'", id="bad-value"),
    pytest.param("train.lr_rate=0.1", "train.lr_rate: unknown key", id="unknown-key"),
])
def test_bad_override(tmp_path, override, expected):
    path = write_config(tmp_path)
    assert load_error(path, [override]).startswith(f"{path}: {expected}")


# --- Methods' parameters: checked when the study builds them ----------------------------------------------------------

@pytest.mark.parametrize("params, expected", [
    ({"temperature": 0}, "stages[1].logit: logit loss 'kd': temperature must be in (0, 100.0], got 0.0"),
    ({"temperature": -2.0}, "stages[1].logit: logit loss 'kd': temperature must be in (0, 100.0], got -2.0"),
    ({"temperature": 1e308}, "stages[1].logit: logit loss 'kd': temperature must be in (0, 100.0], got 1e+308"),
    ({"alpha": -0.1}, "stages[1].logit: logit loss 'kd': alpha must be in [0, 1], got -0.1"),
    ({"alpha": 1.5}, "stages[1].logit: logit loss 'kd': alpha must be in [0, 1], got 1.5"),
    ({"temperature": "hot"}, "stages[1].logit.temperature: expected float, got 'hot'"),
    ({"temprature": 2}, "stages[1].logit.temprature: unknown key (did you mean 'temperature'? choose from: alpha, "
                        "scale, standardize, temperature)"),
])
def test_kd_parameters_are_checked(params, expected):
    with pytest.raises(ConfigError) as e:
        LOGIT_LOSSES.build("kd", "stages[1].logit", params)
    assert str(e.value) == expected
    assert e.value.key.startswith("stages[1].logit")


@pytest.mark.parametrize("params", [{"alpha": 0}, {"alpha": 1}, {"temperature": 0.5, "alpha": 0.9}])
def test_kd_parameter_bounds_are_inclusive(params):
    method = LOGIT_LOSSES.build("kd", "stages[1].logit", dict(params))
    assert method.ce_weight == pytest.approx(1 - params["alpha"])


def test_unknown_logit_loss_name():
    with pytest.raises(ConfigError, match=r"^stages\[1\]\.logit: unknown logit loss 'kdd' \(did you mean 'kd'\?"):
        LOGIT_LOSSES.build("kdd", "stages[1].logit", {})


# --- run.main: one error line, before any training --------------------------------------------------------------------

def test_cli_missing_config_file(tmp_path, one_error_line):
    path = tmp_path / "absent.yaml"
    assert cli_error(one_error_line, path) == f"error: {path}: cannot read config (No such file or directory)"


def test_cli_invalid_yaml_names_line_and_column(tmp_path, one_error_line):
    path = tmp_path / "broken.yaml"
    path.write_text("name: study\nstages: [{name: baseline}\n")
    assert cli_error(one_error_line, path) == \
        f"error: {path}: invalid YAML (line 3, column 1: expected ',' or ']', but got '<stream end>')"


def test_cli_duplicate_yaml_keys_are_an_error_not_last_one_wins(tmp_path, one_error_line):
    path = tmp_path / "twice.yaml"
    path.write_text("name: study\ntrain: {lr: 0.1}\nstages: [{name: baseline}]\ntrain: {lr: 0.2}\n")
    assert cli_error(one_error_line, path) == f"error: {path}: invalid YAML (line 4, column 1: duplicate key 'train')"


@pytest.mark.parametrize("override, expected", [
    ("stages.0.features.0.studnet=stages.1", "stages[0].features[0].studnet: unknown key (did you mean 'student'? "
                                             "choose from: io, name, student, teacher, weight)"),
    ("stages.0.logit.temprature=2", "stages[0].logit.temprature: unknown key (did you mean 'temperature'? "
                                    "choose from: alpha, name, scale, standardize, temperature)"),
])
def test_a_misspelt_key_in_a_method_entry_offers_the_entry_keys_too(smoke_config, one_error_line, override, expected):
    cfg = smoke_config(stages=[{"name": "f", "logit": {"name": "kd"},
                                "features": [{"name": "fitnets", "student": "stages.1", "teacher": "layer2"}]}])
    assert cli_error(one_error_line, cfg, override) == f"error: {cfg}: {expected}"


@pytest.mark.parametrize("updates, sets, expected", [
    ({"trian": {"epochs": 1}}, (), "trian: unknown key (did you mean 'train'?"),
    ({"train": {"epochs": "ten"}}, (), "train.epochs: expected int, got 'ten'"),
    ({"train": {"lr": -1}}, (), "train.lr: must be in (0, 100.0], got -1.0"),
    ({}, ("train.schedule=cos",), "train.schedule: unknown value 'cos' (did you mean 'cosine'?"),
    ({}, ("stages.2.name=x",), "--set stages.2: no list item 2 (the list has 1)"),
])
def test_cli_config_error_names_file_and_key(tmp_path, one_error_line, updates, sets, expected):
    path = write_config(tmp_path, updates)
    assert cli_error(one_error_line, path, *sets).startswith(f"error: {path}: {expected}")


@pytest.mark.parametrize("override, expected", [
    ("train.lr=[0.1", "--set train.lr: value is not valid YAML: '[0.1'"),
    ("train.epochs.x=5", "--set train.epochs.x: 'train.epochs' is not a mapping"),
    ("name.x=1", "--set name.x: 'name' is not a mapping"),
])
def test_cli_malformed_override(tmp_path, one_error_line, override, expected):
    path = write_config(tmp_path, {"train": {"epochs": 3}})
    assert cli_error(one_error_line, path, override) == f"error: {path}: {expected}"


# Errors found only once the data exists (layer names, methods, models, dataset): a tiny FakeData study.

STAGES = [
    {"name": "baseline"},
    {"name": "kd", "logit": {"name": "kd", "temperature": 4.0, "alpha": 0.9},
     "features": [{"name": "fitnets", "student": "stages.1", "teacher": "layer2"}]},
]


@pytest.fixture
def fake_study(tmp_path):
    base = {"name": "tiny", "output_dir": str(tmp_path / "runs"), "device": "cpu",
            "data": {"dataset": "fake", "image_size": 16, "val_size": 16, "train_subset": 32, "test_subset": 16,
                     "batch_size": 16, "eval_batch_size": 16, "num_workers": 0},
            "teacher": {"checkpoint": str(tmp_path / "teacher.pt"), "train": {"epochs": 1}},
            "student": {"kwargs": {"channels": [8, 16], "blocks": 1}},
            "train": {"epochs": 1}, "stages": STAGES}
    return write_config(tmp_path, base=base, name="tiny.yaml"), tmp_path


STUDY_ERRORS = [
    pytest.param("stages.1.logit.temperature=0",
                 "stages[1].logit: logit loss 'kd': temperature must be in (0, 100.0], got 0.0",
                 id="temperature"),
    pytest.param("stages.1.logit.alpha=1.5", "stages[1].logit: logit loss 'kd': alpha must be in [0, 1], got 1.5",
                 id="alpha"),
    pytest.param("stages.1.logit.name=kdd", "stages[1].logit: unknown logit loss 'kdd' (did you mean 'kd'?",
                 id="logit"),
    pytest.param("stages.1.features.0.name=fitnet",
                 "stages[1].features[0]: unknown feature loss 'fitnet' (did you mean 'fitnets'?", id="feature-loss"),
    pytest.param("stages.1.features.0.student=stages.9",
                 "stages[1].features[0].student: no layer 'stages.9' in this model; "
                 "layers: stages, stages.0, stages.1, pool, fc", id="student-layer"),
    pytest.param("stages.1.features.0.teacher=layer9",
                 "stages[1].features[0].teacher: no layer 'layer9' in this model; layers: conv1, bn1, relu, maxpool, "
                 "layer1, layer1.0, layer1.1, layer2, layer2.0, layer2.1, layer3, ", id="teacher-layer"),
    pytest.param("student.name=cnnn", "student.name: unknown model 'cnnn' (did you mean 'cnn'?", id="model"),
    pytest.param("train.subset=33", "train.subset: 33 is more than the 32 training images", id="subset"),
    pytest.param("stages.1.logit.name=KD", "stages[1].logit: unknown logit loss 'KD' (did you mean 'kd'?", id="case"),
    pytest.param("teacher.train.subset=0", "teacher.train.subset: must be >= 1 or null, got 0", id="subset-0"),
    pytest.param("teacher.kwargs.stem_stride=3", "teacher.kwargs: model 'resnet18': stem_stride must be 1, 2 or 4",
                 id="stem-stride"),
    pytest.param("student.kwargs.chanels=[8]", "student.kwargs.chanels: unknown key (did you mean 'channels'?",
                 id="model-kwargs"),
    pytest.param("data.dataset=cifar", "data.dataset: unknown dataset 'cifar' (did you mean 'cifar10'? choose from: "
                 "cifar10, fake, fashion_mnist, folders, imagenet)", id="dataset"),
]


def test_fake_study_config_is_valid(fake_study):
    path, _ = fake_study
    assert [s.name for s in load_config(path).stages] == ["baseline", "kd"]


@pytest.mark.parametrize("override, expected", STUDY_ERRORS)
def test_cli_study_error_before_training(fake_study, one_error_line, override, expected):
    path, tmp_path = fake_study
    line = cli_error(one_error_line, path, override)
    assert line.startswith(f"error: {path}: {expected}"), line
    assert not (tmp_path / "teacher.pt").exists()
    assert not (tmp_path / "runs").exists()


def test_an_alias_bomb_is_refused_before_it_is_built(tmp_path, one_error_line):
    """Nine lines of nested aliases stand for 10**9 values: refused by counting, never built or printed."""
    lines = ["name: bomb", "stages: [{name: b}]", "data:", "  l0: &l0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"  l{i}: &l{i} [{', '.join([f'*l{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")
    line = one_error_line.cli("--config", path)
    assert "aliases (*name) expand it to more than 100,000 values" in line and len(line) < 300, line


def test_a_config_nested_past_reason_is_one_line(tmp_path, one_error_line):
    path = tmp_path / "deep.yaml"
    path.write_text("name: deep\nstages: [{name: b}]\ntrain: {milestones: " + "[" * 50_000 + "]" * 50_000 + "}\n")
    assert "invalid YAML (nested too deeply to read" in one_error_line.cli("--config", path)


def test_a_few_aliases_are_still_welcome(tmp_path):
    """Anchors that share one recipe between the teacher and the students are how YAML avoids repeating it."""
    path = tmp_path / "shared.yaml"
    path.write_text("name: s\nstages: [{name: b}]\ntrain: &recipe {epochs: 3, lr: 0.1}\nteacher: {train: *recipe}\n")
    cfg = load_config(path)
    assert (cfg.teacher.train.epochs, cfg.teacher.train.lr) == (3, 0.1)


@pytest.mark.parametrize("sets, expected", [
    (("data.batch_size=64", "train.subset=32"),
     "data.batch_size: 64 is more than the 32 images a model trains on"),
    (("eval.batch_size=100000000",), "eval.batch_size: 100000000 images of 3x16x16 take"),
    (("cache.mode=logits", "cache.topk=11"), "cache.topk: 11 is more than the 10 classes"),
])
def test_sizes_beyond_the_data_or_the_memory_stop_before_any_training(smoke_config, one_error_line, sets, expected):
    line = one_error_line.study(smoke_config(), *(a for s in sets for a in ("--set", s)))
    assert expected in line, line
