"""Measuring and reporting: every model's inference cost on the same inputs and settings, one after another in one
process, its deployment when asked for, then report.json, report.md and the pictures."""
import contextlib
import os

from kd.data.datasets import eval_loaders, plain_train_images
from kd.errors import ConfigError, first_line
from kd.log import info
from kd.measure.evaluate import profile
from kd.measure.metrics import measured, over_seeds
from kd.measure.report import write_report


def row(result):
    """A Result as one flat report row (training facts beside the accuracy), without its identity and curve."""
    return {k: v for k, v in {**vars(result), **result.training}.items() if k not in ("training", "identity", "curve")}


@contextlib.contextmanager
def out_of_memory(key, what):
    """An allocation the device refuses, as one line naming the config key that sized it: the models' results are
    stored already, so the next run goes straight to measuring."""
    try:
        yield
    except RuntimeError as e:  # torch.OutOfMemoryError on a GPU; 'can't allocate memory' on a CPU
        if "memory" not in str(e):
            raise
        raise ConfigError(key, f"out of memory {what} ({first_line(e)}); lower it, and run again: every trained "
                          "model is kept") from None


def deploy_module():
    """kd/deploy/runtimes.py, imported only for deploy.onnx: onnx and onnxruntime are not needed to train and
    measure."""
    try:
        from kd.deploy import runtimes
    except ImportError as e:
        raise ConfigError("deploy.onnx", f"needs onnx, onnxscript and onnxruntime (Pipfile.lock pins them): {e}; "
                          "install them, or set deploy.onnx: false") from None
    return runtimes


def summaries(teacher_result, stage_results, seeds):
    """{model: report row}: the teacher's, and each stage's over its seeds."""
    return {"teacher": row(teacher_result), **{name: over_seeds([row(r) for r in results], seeds)
                                               for name, results in stage_results.items()}}


def measure(setting, teacher, students, rows):
    """Every model's inference cost (and with deploy.onnx, its cost in every CPU runtime, kd/deploy/runtimes.py),
    on fresh, hook-free models holding the weights a user would deploy: the teacher's checkpoint, and a stage's
    first seed's best.pt (checked again now)."""
    s, d = setting, setting.cfg.deploy
    deploy = deploy_module() if d.onnx else None
    calibration = plain_train_images(s.data, d.calibration_images) if d.onnx and d.int8 else None
    test = eval_loaders(s.data, s.cfg.data, deploy.CPU)[1] if d.onnx else None  # one loader for all
    layout = s.runtime.student.memory_format
    for name, summary in rows.items():
        model, path, folder, card = (teacher if name == "teacher" else students).deployable(summary)
        info(f"[{name}] measuring inference cost on {s.device}")
        with out_of_memory("eval.batch_size", f"measuring {name} at batch {s.cfg.eval.batch_size}"):
            summary.update(profile(model, s.image_shape, s.device, s.cfg.eval, layout),
                           checkpoint_bytes=os.path.getsize(path), **measured(model, s.image_shape, s.device))
        if d.onnx:
            summary["deploy"] = deploy.measure(name, model, card, s.folder.model(folder), os.path.getsize(path),
                                               test, calibration, s.cfg.eval)
    return rows


def report(setting, teacher, rows, deployed):
    """report.json and report.md, with the run's decisions and its time by phase; then the pictures."""
    s = setting
    facts = {**s.runtime.facts(), "teacher_note": teacher.note, "deploy": deployed, "seconds": s.clock.phases,
             "seconds_within": s.clock.parts}
    written = write_report(s.folder.root, s.cfg, s.data, s.device, rows, facts)
    try:
        from kd.measure.plots import write_plots  # matplotlib: a picture is not worth failing a finished study for
    except ImportError as e:
        info(f"[plots] skipped: {e} (Pipfile.lock pins matplotlib)")
        return written
    for path in write_plots(s.folder.root, written):
        info(f"[plots] {path}")
    return written
