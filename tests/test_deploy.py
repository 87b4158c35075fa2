"""Deployment: checkpoints that describe their model, ONNX export and int8, the report's deployment table, and
`run.py predict` / `run.py export`."""
import json
import os
import signal
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("onnxruntime", reason="deployment needs onnx and onnxruntime (installed from Pipfile.lock)")

import kd.store  # noqa: E402
import run  # noqa: E402
from kd.config import Config, DataConfig, from_dict  # noqa: E402
from kd.data.datasets import build_data, plain_train_images  # noqa: E402
from kd.data.tensors import normalize  # noqa: E402
from kd.deploy import card as cards  # noqa: E402
from kd.deploy import export  # noqa: E402
from kd.errors import ConfigError, KDError  # noqa: E402
from kd.study.study import Study  # noqa: E402
from kd.train.models import MODELS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
CIFAR_ARCHIVE = SHARED / "data" / "cifar10-jpeg.tar.gz"
CIFAR_TEACHER = SHARED / "device-runs" / "2026-11-26-h200" / "cifar10_resnet18_teacher_fp16.pt"
CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def small_card(channels=1, size=28):
    return {"model": {"name": "cnn", "kwargs": {"channels": [8, 16], "blocks": 1}},
            "input": {"channels": channels, "image_size": size, "resize": size, "mean": [0.5] * channels,
                      "std": [0.25] * channels},
            "classes": [f"class{i}" for i in range(10)], "made_by": {"study": "test"}}


@pytest.mark.slow
def test_export_round_trip_equals_pytorch_at_any_batch_size(tmp_path):
    card = small_card()
    torch.manual_seed(0)
    model = cards.build(card).eval()
    export.export(model, card, tmp_path / "m.onnx")
    assert export.read_card(tmp_path / "m.onnx") == card
    onnx_model = export.OnnxModel(tmp_path / "m.onnx", threads=1)
    for batch in (1, 3, 64):
        x = torch.randn(batch, 1, 28, 28)
        with torch.no_grad():
            reference = model(x)
        assert (onnx_model(x) - reference).abs().max().item() < 1e-4
        assert torch.equal(onnx_model(x).argmax(1), reference.argmax(1))


@pytest.fixture(scope="module")
def fashion_student(tmp_path_factory):
    """A small CNN trained for four epochs on 3,000 real Fashion-MNIST images, and the data."""
    if not Path("/usr/share/datasets/fashion-mnist").exists():
        pytest.skip("needs Debian's dataset-fashion-mnist")
    root = tmp_path_factory.mktemp("fashion")
    data = build_data(DataConfig(dataset="fashion_mnist", root=str(root), download=False, val_size=500,
                                 train_subset=3000, test_subset=1000))
    (x, y), = [data.tensors["train"]]
    x = normalize(x, data.mean, data.std)
    torch.manual_seed(0)
    model = cards.build({**small_card(), "model": {"name": "cnn", "kwargs": {"channels": [16, 32], "blocks": 1}}})
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(4):
        for i in range(0, len(y), 100):
            loss = torch.nn.functional.cross_entropy(model(x[i:i + 100]), y[i:i + 100])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return model.eval(), data


@pytest.mark.slow
def test_int8_keeps_top1_agreement_on_real_images_and_is_smaller(fashion_student, tmp_path):
    model, data = fashion_student
    card = {**small_card(), "model": {"name": "cnn", "kwargs": {"channels": [16, 32], "blocks": 1}}}
    export.export(model, card, tmp_path / "m.onnx")
    export.quantize(tmp_path / "m.onnx", tmp_path / "m.int8.onnx", plain_train_images(data, 256))
    test_x, test_y = data.tensors["test"]
    x = normalize(test_x, data.mean, data.std)
    int8 = export.OnnxModel(tmp_path / "m.int8.onnx", threads=1)
    a = export.agreement(model, int8, x)
    with torch.no_grad():
        fp32_top1 = (model(x).argmax(1) == test_y).float().mean().item()
    int8_top1 = (int8(x).argmax(1) == test_y).float().mean().item()
    # measured on an AMD EPYC (AVX2), onnxruntime 1.32: 97.9% agreement, top-1 fp32 61.1%, int8 60.6%; with
    # full-range 8-bit weights this CPU's saturating int16 sums make it far worse (see export.quantize)
    assert a["top1_agreement"] >= 0.95, a
    assert fp32_top1 > 0.55 and int8_top1 >= fp32_top1 - 0.02, (fp32_top1, int8_top1)
    assert export.read_card(tmp_path / "m.int8.onnx") == card
    assert (tmp_path / "m.int8.onnx").stat().st_size < 0.6 * (tmp_path / "m.onnx").stat().st_size  # 18 of 33 kB


@pytest.mark.slow
def test_a_study_exports_and_measures_every_model_in_every_runtime(smoke_config, tmp_path, capsys):
    cfg = smoke_config(stages=[{"name": "baseline"}, {"name": "kd", "logit": {"name": "kd"}}],
                       deploy={"onnx": True, "calibration_images": 64}, eval={"batch_size": 8, "warmup": 1,
                                                                             "repeats": 3})
    assert run.main(["--config", str(cfg), "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    folder = tmp_path / "runs" / "smoke"
    report = json.loads((folder / "report.json").read_text())
    assert report["meta"]["deploy"]["calibration_images"] == 64 and report["meta"]["deploy"]["opset"] == export.OPSET
    for name in ("teacher", "baseline", "kd"):
        deployed = report["models"][name]["deploy"]
        assert list(deployed) == ["pytorch", "onnxruntime", "onnxruntime-int8"]
        assert deployed["onnxruntime"]["top1_agreement"] == 1.0
        assert deployed["onnxruntime"]["max_abs_logit_diff"] < 1e-3
        assert deployed["pytorch"]["test_top1"] == pytest.approx(report["models"][name]["test_top1"])
        for runtime in deployed.values():
            assert runtime["latency_b1_ms"] > 0 and runtime["latency_b8_p90_ms"] >= runtime["latency_b8_ms"]
        for file in ("model.onnx", "model.int8.onnx"):
            assert export.read_card(folder / name / file)["model"]["name"] == ("resnet18" if name == "teacher"
                                                                                 else "cnn")
    assert report["models"]["teacher"]["deploy"]["pytorch"]["speedup_b1"] == 1.0
    assert "Deployment on the CPU" in out and "| kd | onnxruntime-int8 |" in out
    for png in ("accuracy_vs_latency.png", "training_curves.png"):
        assert Image.open(folder / png).format == "PNG"

    # the student's best.pt alone rebuilds the model, which matches its ONNX file
    model, card = cards.load_checkpoint(folder / "kd" / "best.pt")
    assert card["made_by"]["model"] == "kd" and card["input"]["image_size"] == 16
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert (model(x) - export.OnnxModel(folder / "kd" / "model.onnx", 1)(x)).abs().max() < 1e-4

    # predict from either file, on an image file
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(tmp_path / "i.png")
    for model_file in ("best.pt", "model.onnx"):
        assert run.main(["predict", str(folder / "kd" / model_file), str(tmp_path / "i.png"), "--top", "3"]) == 0
        line = capsys.readouterr().out.strip()
        assert line.startswith(f"{tmp_path / 'i.png'}: ") and line.count("%") == 3, line

    # a best.pt written before cards existed gets its card when the study runs again
    ckpt = kd.store.load(folder / "kd" / "best.pt", "")
    kd.store.save({k: v for k, v in ckpt.items() if k != "card"}, folder / "kd" / "best.pt")
    assert run.main(["--config", str(cfg), "--device", "cpu", "--set", "deploy.onnx=false"]) == 0
    assert "[kd] added its card" in capsys.readouterr().out
    assert cards.load_checkpoint(folder / "kd" / "best.pt")[1] == card


def test_a_teacher_whose_card_expects_other_classes_is_refused(make_study, make_config, tmp_path):
    make_study()  # trains the teacher and saves it with its card
    path = tmp_path / "teacher.pt"
    ckpt = kd.store.load(path, "")
    assert ckpt["card"]["classes"][0] == "T-shirt/top" and ckpt["card"]["input"]["channels"] == 1
    kd.store.save({**ckpt, "card": {**ckpt["card"], "classes": ckpt["card"]["classes"][::-1]}}, path)
    cfg = from_dict(Config, make_config(teacher={"accept_checkpoint": False}))
    cfg.validate()
    with pytest.raises(ConfigError, match=r"expects other input \(classes: "):
        Study(cfg).check()


def test_bad_model_and_image_files_get_one_line_each(tmp_path, capsys, one_error_line):
    image = tmp_path / "i.png"
    Image.new("L", (28, 28), 128).save(image)
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.onnx").write_bytes(b"not a model")
    kd.store.save({"model": cards.build(small_card()).state_dict()}, tmp_path / "no_card.pt")
    wider = {**small_card(), "model": {"name": "cnn", "kwargs": {"channels": [16, 32], "blocks": 1}}}
    kd.store.save({"model": cards.build(small_card()).state_dict(), "card": wider}, tmp_path / "wrong_card.pt")
    for model, says in (("garbage.pt", "not a PyTorch checkpoint"), ("garbage.onnx", "not an ONNX file"),
                        ("no_card.pt", "carries no card"),
                        ("wrong_card.pt", "weights do not fit the model its card describes (size mismatch for ")):
        assert says in one_error_line.cli("predict", tmp_path / model, image)
    assert "carries no card" in one_error_line.cli("export", tmp_path / "no_card.pt")
    for command, missing, says in (("export", "missing.pt", "missing.pt: no such file"),
                                   ("predict", "missing.pt", "missing.pt: no such file"),
                                   ("predict", "missing.onnx", "missing.onnx: no such file"),
                                   ("export", "", "a folder, not a file")):
        line = one_error_line.cli(command, tmp_path / missing, *([image] if command == "predict" else []))
        assert says in line and "damaged" not in line, line

    kd.store.save({"model": cards.build(small_card()).state_dict(), "card": small_card()}, tmp_path / "ok.pt")
    (tmp_path / "text.jpg").write_text("hello")
    assert run.main(["predict", str(tmp_path / "ok.pt"), str(tmp_path / "text.jpg"), str(image),
                     str(tmp_path / "gone.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {tmp_path / 'text.jpg'}: not an image file",
                                         f"error: {tmp_path / 'gone.png'}: no such file"]
    assert captured.out.startswith(f"{image}: class")  # the good image is still predicted


def linear_onnx(path, card, outputs=10, fixed=True):
    """An ONNX classifier of one linear layer over `card`'s input, with `outputs` scores (a number the graph fixes,
    or leaves free), saved as `export` saves: built in a moment, where a torch export takes seconds."""
    from onnx import TensorProto, helper, numpy_helper
    i = card["input"]
    shape = [i["channels"], i["image_size"], i["image_size"]]
    weights = np.random.default_rng(0).standard_normal((outputs, int(np.prod(shape)))).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Flatten", ["images"], ["flat"]),
         helper.make_node("Gemm", ["flat", "w", "b"], ["logits"], transB=1)], "linear",
        [helper.make_tensor_value_info("images", TensorProto.FLOAT, ["batch", *shape])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", outputs if fixed else "classes"])],
        [numpy_helper.from_array(weights, "w"), numpy_helper.from_array(np.zeros(outputs, np.float32), "b")])
    export.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", export.OPSET)]), card, path)
    return path


def rewrite_props(path, **props):
    """Change (or, given None, remove) metadata entries of an ONNX file, leaving its weights as they are."""
    import onnx
    proto = onnx.load(str(path))
    kept = {p.key: p.value for p in proto.metadata_props}
    kept.update(props)
    onnx.helper.set_model_props(proto, {k: v for k, v in kept.items() if v is not None})
    path.write_bytes(proto.SerializeToString())


def test_onnx_weights_changed_after_export_are_refused_where_the_file_is_opened(tmp_path, one_error_line):
    image = tmp_path / "i.png"
    Image.new("L", (28, 28), 128).save(image)
    fp32, int8 = linear_onnx(tmp_path / "model.onnx", small_card()), tmp_path / "model.int8.onnx"
    export.quantize(fp32, int8, torch.randn(16, 1, 28, 28))
    assert run.main(["predict", str(int8), str(image)]) == 0
    one_error_line.capsys.readouterr()

    import onnx
    weight = max(onnx.load(str(int8)).graph.initializer, key=lambda t: len(t.raw_data)).raw_data
    data = bytearray(int8.read_bytes())
    assert data.count(weight) == 1
    data[data.find(weight) + len(weight) // 2] ^= 0x10  # one bit of one int8 weight: the file still runs
    int8.write_bytes(data)
    assert one_error_line.cli("predict", int8, image) == f"error: {int8} is damaged (its weights do not match " \
        "the digest recorded at export); export it again from its checkpoint (run.py export)"
    for opener in (export.read_card, lambda path: export.OnnxModel(path, 1)):
        with pytest.raises(KDError, match="do not match the digest"):
            opener(int8)

    rewrite_props(fp32, **{export.WEIGHTS: None})  # as exported before files carried the digest
    line = one_error_line.cli("predict", fp32, image)
    assert "records no digest of its weights" in line and "export it again" in line, line


def test_onnx_cards_that_are_not_json_or_do_not_fit_the_model_are_one_line(tmp_path, one_error_line):
    image = tmp_path / "i.png"
    Image.new("L", (28, 28), 128).save(image)
    three = {**small_card(), "classes": ["a", "b", "c"]}
    rewrite_props(linear_onnx(tmp_path / "text.onnx", small_card()), **{export.CARD: "{not json"})
    linear_onnx(tmp_path / "three.onnx", three)
    linear_onnx(tmp_path / "three_free.onnx", three, fixed=False)  # only the first prediction shows 10 scores
    for name, card in (("no_input", {k: v for k, v in small_card().items() if k != "input"}),
                       ("numbers", {**small_card(), "classes": list(range(10))})):
        rewrite_props(linear_onnx(tmp_path / f"{name}.onnx", small_card()), **{export.CARD: json.dumps(card)})
    for name, says in (("text.onnx", "its card is not JSON"),
                       ("three.onnx", "its card lists 3 classes but its model gives 10 scores per image"),
                       ("three_free.onnx", "its card lists 3 classes but its model gives 10 scores per image"),
                       ("no_input.onnx", "its card is not valid (input (a mapping) is needed)"),
                       ("numbers.onnx", "its card is not valid (classes is [0, 1, ")):
        line = one_error_line.cli("predict", tmp_path / name, image)
        assert line.startswith(f"error: {tmp_path / name}: {says}"), line


@MODELS.register("ten_scores")
class TenScores(torch.nn.Module):
    """Ten scores per image, whatever number of classes it is built for."""

    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.fc = torch.nn.Linear(in_channels * image_size ** 2, 10)

    def forward(self, x):
        return self.fc(x.flatten(1))


def test_checkpoint_cards_that_are_not_valid_are_one_line(tmp_path, one_error_line):
    image = tmp_path / "i.png"
    Image.new("L", (28, 28), 128).save(image)
    state = cards.build(small_card()).state_dict()
    card, i = small_card(), small_card()["input"]
    for name, broken, says in (
            ("text", "not a card", "a str, not a mapping"),
            ("no_model", {k: v for k, v in card.items() if k != "model"}, "model.name (a text)"),
            ("channels", {**card, "input": {**i, "channels": 2}}, "input.channels is 2, not 1 or 3"),
            ("huge", {**card, "input": {**i, "image_size": 10 ** 9}}, "input.image_size is 1000000000, not a "),
            ("std", {**card, "input": {**i, "std": [0.0]}}, "input.std is [0.0], not 1 number(s) above 0"),
            ("classes", {**card, "classes": "abc"}, "classes is 'abc', not a list of class names"),
            ("unknown", {**card, "model": {"name": "nonesuch", "kwargs": {}}}, "describes no model this toolkit"),
            ("three", {**card, "classes": ["a", "b", "c"]}, "weights do not fit the model its card describes "
                                                            "(size mismatch for "),
            ("ten", {**card, "model": {"name": "ten_scores", "kwargs": {}}, "classes": ["a", "b", "c"]},
             "its card lists 3 classes but its model gives 10 scores per image")):
        weights = cards.build(broken).state_dict() if name == "ten" else state
        kd.store.save({"model": weights, "card": broken}, tmp_path / f"{name}.pt")
        for command in (("predict", tmp_path / f"{name}.pt", image), ("export", tmp_path / f"{name}.pt")):
            line = one_error_line.cli(*command)
            assert line.startswith(f"error: {tmp_path / name}.pt: ") and says in line, line
    # a teacher checkpoint whose card is not valid is compared with the study's as differing, not a traceback
    assert cards.mismatch("not a card", card) == ["card: a str, not a mapping"]


def test_image_inputs_that_are_not_plain_image_files_are_one_line_each(tmp_path, capsys, one_error_line):
    kd.store.save({"model": cards.build(small_card()).state_dict(), "card": small_card()}, tmp_path / "ok.pt")
    good = tmp_path / "good.png"
    Image.new("L", (28, 28), 128).save(good)
    (tmp_path / "folder.png").mkdir()
    (tmp_path / "broken.png").symlink_to(tmp_path / "nowhere.png")
    os.mkfifo(tmp_path / "fifo.png")  # opening it would wait for a writer forever
    Image.new("1", (15000, 15000)).save(tmp_path / "bomb.png")  # 225 million pixels in a few kB
    Image.new("1", (10000, 10000)).save(tmp_path / "huge.png")  # over Pillow's warning limit, under its error one
    assert (tmp_path / "bomb.png").stat().st_size < 100_000
    says = {"folder.png": "a folder, not a file", "broken.png": "a link to ",
            "fifo.png": "a FIFO (named pipe), not a file",
            "bomb.png": "too large to decode safely (Image size (225000000 pixels) exceeds limit of",
            "huge.png": "too large to decode safely (Image size (100000000 pixels) exceeds limit of"}

    def hung(*_):
        raise TimeoutError("an image file was opened before its type was checked, and blocked")
    previous = signal.signal(signal.SIGALRM, hung)
    signal.alarm(20)
    try:
        assert run.main(["predict", str(tmp_path / "ok.pt"), *(str(tmp_path / n) for n in says), str(good)]) == 2
        captured = capsys.readouterr()
        for name, err in zip(says, captured.err.splitlines(), strict=True):
            assert err.startswith(f"error: {tmp_path / name}: {says[name]}"), err
        assert captured.out.startswith(f"{good}: class")
        for name in says:
            line = one_error_line.cli("export", tmp_path / "ok.pt", "--images", good, tmp_path / name)
            assert line.startswith(f"error: {tmp_path / name}: {says[name]}"), line
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@pytest.mark.slow
def test_export_command_writes_checked_fp32_and_int8_files(tmp_path, capsys):
    torch.manual_seed(0)
    kd.store.save({"model": cards.build(small_card()).state_dict(), "card": small_card()}, tmp_path / "ok.pt")
    images = []
    for i in range(4):
        images.append(tmp_path / f"{i}.png")
        Image.fromarray(np.random.default_rng(i).integers(0, 256, (28, 28), dtype=np.uint8)).save(images[-1])
    assert run.main(["export", str(tmp_path / "ok.pt"), "--int8", "--images", *map(str, images)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(" (")[0] for line in lines] == [str(tmp_path / "ok.onnx"), str(tmp_path / "ok.int8.onnx")]
    assert "agrees with PyTorch on 100.0% of 4 image(s)" in lines[0]


@pytest.mark.slow
@pytest.mark.skipif(not (CIFAR_ARCHIVE.exists() and CIFAR_TEACHER.exists()),
                    reason="needs ../shared: the CIFAR-10 archive and the GPU-trained teacher")
def test_predict_names_the_classes_of_real_cifar10_photos(tmp_path, capsys):
    """The shared teacher (88% on the test split) with a card, on two test JPEGs of each class."""
    state = kd.store.load(CIFAR_TEACHER, "", unsigned_ok=True)["model"]
    data = SimpleNamespace(in_channels=3, image_size=32, resize=32, classes=CIFAR_CLASSES,
                           mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))  # kd.data.datasets.cifar10's
    card = cards.make(SimpleNamespace(name="resnet18", kwargs={}), data, {"study": "test"})
    kd.store.save({"model": state, "card": card}, tmp_path / "teacher.pt")
    wanted = {f"test/{c}/{i:04d}.jpg" for c in CIFAR_CLASSES for i in range(2)}
    with tarfile.open(CIFAR_ARCHIVE) as tar:
        for member in tar:
            if member.name in wanted:
                (tmp_path / member.name).parent.mkdir(parents=True, exist_ok=True)
                (tmp_path / member.name).write_bytes(tar.extractfile(member).read())
    files = sorted(str(tmp_path / name) for name in wanted)
    assert run.main(["predict", str(tmp_path / "teacher.pt"), *files]) == 0
    lines = capsys.readouterr().out.splitlines()
    right = sum(Path(line.split(": ")[0]).parent.name == line.split(": ")[1].split()[0] for line in lines)
    assert len(lines) == 20 and right >= 15, lines  # measured: 19 of 20


def test_deploy_without_onnxruntime_stops_before_training_with_one_line(smoke_config, monkeypatch, tmp_path,
                                                                        one_error_line):
    import kd.deploy
    import kd.store
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as on a machine whose Python lacks it
    for name in ("runtimes", "export"):
        monkeypatch.delitem(sys.modules, f"kd.deploy.{name}", raising=False)
        monkeypatch.delattr(kd.deploy, name, raising=False)
    err = one_error_line.study(smoke_config(deploy={"onnx": True}))
    assert "deploy.onnx" in err and "set deploy.onnx: false" in err, err
    assert not (tmp_path / "teacher.pt").exists()
    kd.store.save({"model": cards.build(small_card()).state_dict(), "card": small_card()}, tmp_path / "ok.pt")
    assert "run.py export needs onnx" in one_error_line.cli("export", tmp_path / "ok.pt")


@MODELS.register("data_dependent")
class DataDependent(torch.nn.Module):
    """Trains fine, but branches on a value, which torch.export cannot trace."""

    def __init__(self, in_channels, num_classes, image_size):
        super().__init__()
        self.fc = torch.nn.Linear(in_channels * image_size ** 2, num_classes)

    def forward(self, x):
        y = self.fc(x.flatten(1))
        return y if y.sum() > 0 else -y


@pytest.mark.slow
def test_a_student_onnx_cannot_take_stops_the_study_before_training(smoke_config, tmp_path, one_error_line):
    err = one_error_line.study(smoke_config(student={"name": "data_dependent", "kwargs": {}},
                                              stages=[{"name": "baseline"}], deploy={"onnx": True}))
    assert "student.name: 'data_dependent' cannot be exported to ONNX (Could not guard on data-dependent" in err, err
    assert not (tmp_path / "teacher.pt").exists()
