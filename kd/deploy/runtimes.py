"""The models as a CPU deployment runs them: PyTorch eager, onnxruntime fp32 and onnxruntime int8, measured one
after another in this process for test top-1, agreement with PyTorch, file size and latency: batch 1 on one
thread (the edge device) and the evaluation batch on all threads (the server)."""
import contextlib
import os
import tempfile
from pathlib import Path

import onnxruntime
import torch

from kd.deploy import export
from kd.errors import ConfigError, KDError
from kd.log import info
from kd.measure.evaluate import latency
from kd.measure.report import device_name

PYTORCH, ONNX, INT8 = "pytorch", "onnxruntime", "onnxruntime-int8"
CPU = torch.device("cpu")


@contextlib.contextmanager
def torch_threads(n):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


def facts(cfg, train_images):
    """What the report says of how the deployment figures were measured."""
    return {"cpu": device_name(CPU), "onnxruntime": onnxruntime.__version__, "opset": export.OPSET,
            "calibration_images": min(cfg.calibration_images, train_images) if cfg.int8 else None}


def write_files(model, card, folder, calibration=None):
    """model.onnx, and with calibration images model.int8.onnx, in `folder`: {runtime: path}."""
    files = {ONNX: folder / "model.onnx"}
    export.export(model, card, files[ONNX])
    if calibration is not None:
        files[INT8] = folder / "model.int8.onnx"
        export.quantize(files[ONNX], files[INT8], calibration)
    return files


def check(models, int8):
    """Export (and quantize) every architecture, untrained, into a temporary folder, so that a model the exporter
    or the quantizer cannot take stops the study before any training. `models`: {config key: (model, card)}."""
    with tempfile.TemporaryDirectory() as tmp:
        for key, (model, card) in models.items():
            i = card["input"]
            calibration = torch.randn(8, i["channels"], i["image_size"], i["image_size"]) if int8 else None
            try:
                write_files(model.to(CPU).eval(), card, Path(tmp) / key, calibration)
            except KDError as e:
                raise ConfigError(f"{key}.name", str(e)) from None


@torch.inference_mode()
def compare(model, runtimes, loader):
    """Test top-1 of the PyTorch model and of each runtime over `loader`, each runtime's top-1 agreement with
    PyTorch, and its largest absolute logit difference from PyTorch's."""
    counts = {name: [0, 0, 0.0] for name in (PYTORCH, *runtimes)}  # correct, agreeing with PyTorch, max |diff|
    n = 0
    for x, y, *_ in loader:
        x, y = x.to(CPU), y.to(CPU)
        reference = model(x)
        for name, run in ((PYTORCH, None), *runtimes.items()):
            logits = reference if run is None else run(x)
            c = counts[name]
            c[0] += (logits.argmax(1) == y).sum().item()
            c[1] += (logits.argmax(1) == reference.argmax(1)).sum().item()
            c[2] = max(c[2], (logits - reference).abs().max().item())
        n += y.numel()
    return {name: {"test_top1": c[0] / n, "top1_agreement": c[1] / n, "max_abs_logit_diff": c[2]}
            for name, c in counts.items()}


def measure(name, model, card, folder, checkpoint_bytes, loader, calibration, cfg):
    """One model (CPU, fp32, eval) in every runtime: {runtime: figures}. Its ONNX files are written to `folder`
    (int8 only given calibration images); `cfg`: the eval settings (batch size, warm-up, repeats)."""
    model = model.to(CPU, memory_format=torch.contiguous_format).eval()
    info(f"[{name}] exporting to ONNX{' and int8' if calibration is not None else ''} in {folder}")
    files = write_files(model, card, folder, calibration)
    threads = torch.get_num_threads()
    sessions = {rt: (export.OnnxModel(path, 1), export.OnnxModel(path, threads)) for rt, path in files.items()}
    info(f"[{name}] test set through PyTorch and {', '.join(files)} on the CPU")
    rows = compare(model, {rt: many for rt, (_, many) in sessions.items()}, loader)
    shape = (card["input"]["channels"], card["input"]["image_size"], card["input"]["image_size"])
    x1, xn = torch.randn(1, *shape), torch.randn(cfg.batch_size, *shape)
    for rt, (one, many) in ((PYTORCH, (model, model)), *sessions.items()):
        with torch_threads(1):
            b1 = latency(one, x1, cfg.warmup, cfg.repeats)
        bn = latency(many, xn, cfg.warmup, cfg.repeats)
        rows[rt].update({"file_bytes": checkpoint_bytes if rt == PYTORCH else os.path.getsize(files[rt]),
                         "threads_bn": threads,
                         "latency_b1_ms": 1000 * b1["median"], "latency_b1_p90_ms": 1000 * b1["p90"],
                         f"latency_b{cfg.batch_size}_ms": 1000 * bn["median"],
                         f"latency_b{cfg.batch_size}_p90_ms": 1000 * bn["p90"]})
    return rows
