"""report.json and report.md: every number measured in this run, ratios derived from them against the teacher."""
import datetime
import json
import platform

import torch

from kd.log import describe_time
from kd.measure import metrics
from kd.measure.metrics import MB
from kd.store import write_text


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model} ({torch.get_num_threads()} threads)"


def deploy_ratios(rows, batch):
    """Each runtime's speed-up and size reduction against the teacher in PyTorch eager, on the CPU."""
    reference = rows["teacher"].get("deploy", {}).get("pytorch")
    for row in rows.values():
        for runtime in row.get("deploy", {}).values():
            runtime["speedup_b1"] = reference["latency_b1_ms"] / runtime["latency_b1_ms"]
            runtime[f"speedup_b{batch}"] = reference[f"latency_b{batch}_ms"] / runtime[f"latency_b{batch}_ms"]
            runtime["size_reduction"] = reference["file_bytes"] / runtime["file_bytes"]


def table(cols, rows):
    lines = ["| " + " | ".join(c for c, _ in cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join(fmt(n, r) for _, fmt in cols) + " |" for n, r in rows.items()]


def markdown(report):
    b = report["meta"]["eval_batch_size"]
    yes = lambda flag: "yes" if flag else "no"
    models, training = metrics.tables(report["models"], b)
    lines = models + ["", "Training (students; mean ± sample std over seeds where several):", ""] + training
    m = report["meta"]
    if m.get("deploy"):
        lines += ["", f"Deployment on the CPU ({m['deploy']['cpu']}):", ""] + deployment(report["models"], b)
    learnt = {who: m.get(f"{who}_train_images", m["train_images"]) for who in ("teacher", "student")}
    of = lambda n: "all of them" if n == m["train_images"] else f"the first {n}"
    subsets = "" if set(learnt.values()) == {m["train_images"]} else \
        f"; the teacher learnt from {of(learnt['teacher'])}, the students from {of(learnt['student'])}"
    notes = [f"Study `{m['study']}` on {m['dataset']} ({m['train_images']} train / {m['val_images']} val / "
             f"{m['test_images']} test images{subsets}), {m['date']}.",
             classes_line(m.get("classes", [])),
             f"Device: {m['device']}; torch {m['torch']}. Latency: median (p90) of {m['repeats']} forward passes "
             f"after {m['warmup']} warm-up passes, inputs already on the device, fp32. Peak memory: one forward pass "
             f"at batch {b}, weights and input included ({m['memory_method']}).",
             "Ratios are the teacher's figure over the model's, measured in the same process; accuracy gap in "
             "percentage points of test top-1. Validation top-1 picked each checkpoint; test is reported only. "
             "Inference is measured on each stage's first seed (all seeds share the architecture). Method "
             "params (connectors, embedding heads) and state (with buffers such as memory banks) train with the "
             "student and are not deployed; train img/s includes them and the teacher's forward pass or cache "
             "reads, not validation.",
             f"Training precision: teacher {m['precision']['teacher.train.amp']} (if trained in this run), students "
             f"{m['precision']['train.amp']}; train.compile: teacher {m['compile']['teacher.train.compile']}, "
             f"students {m['compile']['train.compile']}; the step in one CUDA graph (train.graph): teacher "
             f"{yes(m['graph']['teacher.train.graph'])}, students {yes(m['graph']['train.graph'])}."]
    if m.get("deploy"):
        d = m["deploy"]
        int8 = "" if d["calibration_images"] is None else (
            "; int8: post-training static quantization (batch norm folded, int8 weights per output channel in 7 "
            f"bits, int8 activations calibrated on {d['calibration_images']} training images)")
        notes.append(f"Deployment: every model exported to ONNX (opset {d['opset']}) and run by onnxruntime "
                     f"{d['onnxruntime']} on the CPU{int8}. Test top-1 and agreement over the whole test split; "
                     f"latency median (p90): batch 1 on one thread, batch {b} on all threads; speed-ups against the "
                     "teacher in PyTorch eager fp32 measured the same way; file: the checkpoint (PyTorch) or the "
                     ".onnx file. Each stage's first seed, as above.")
        notes += [f"**int8 costs {n} {100 * lost:.2f} points of test top-1** (more than 1 point)."
                  for n, lost in int8_losses(report["models"]) if lost > 0.01]
    if m.get("seconds"):
        notes.append("Wall time of this run by phase, and within the teacher's and each stage's: training epochs, "
                     "validation, checkpoints, test evaluation and other work (building models, loading weights): "
                     + describe_time(m["seconds"], m.get("seconds_within", {})) + ".")
    if m["teacher_note"]:
        notes.append(f"**The teacher checkpoint was used although it {m['teacher_note']}** "
                     "(teacher.accept_checkpoint).")
    return "\n".join(lines + [""] + notes) + "\n"


def classes_line(classes, shown=8):
    """The classes the models tell apart, as their names (ImageNet's words where the data has them)."""
    more = f"; and {len(classes) - shown} more" if len(classes) > shown else ""
    return f"{len(classes)} classes: " + "; ".join(classes[:shown]) + more + "."


def int8_losses(models):
    """(model, test top-1 lost by its int8 copy against PyTorch) for every model quantized."""
    return [(n, r["deploy"]["pytorch"]["test_top1"] - r["deploy"]["onnxruntime-int8"]["test_top1"])
            for n, r in models.items() if "onnxruntime-int8" in r.get("deploy", {})]


def deployment(models, b):
    rows = {(n, rt): r for n, row in models.items() for rt, r in row.get("deploy", {}).items()}
    cols = [("model", lambda k, r: k[0]), ("runtime", lambda k, r: k[1]),
            ("file MB", lambda k, r: f"{r['file_bytes'] / MB:.2f}"),
            ("test top-1", lambda k, r: f"{100 * r['test_top1']:.2f}"),
            ("agrees with PyTorch", lambda k, r: f"{100 * r['top1_agreement']:.2f}%"),
            ("max logit diff", lambda k, r: f"{r['max_abs_logit_diff']:.1e}"),
            ("b1, 1 thread ms (p90)", lambda k, r: metrics.timing(2)(r, "latency_b1_ms")),
            (f"b{b}, all threads ms (p90)", lambda k, r: metrics.timing(1)(r, f"latency_b{b}_ms")),
            (f"speed-up b1 / b{b}", lambda k, r: f"{r['speedup_b1']:.1f}x / {r[f'speedup_b{b}']:.1f}x"),
            ("smaller", lambda k, r: f"{r['size_reduction']:.1f}x")]
    return table(cols, rows)


def write_report(run_dir, cfg, data, device, rows, facts):
    """`facts`: the study's own, {"precision": {config key: precision used}, "compile": {config key: mode},
    "graph": {config key: whether the step was one CUDA graph}, "teacher_note": what differs or None, "deploy":
    kd/deploy/runtimes.py's facts or None, "seconds": {phase: wall seconds}, "seconds_within": {phase: {part: wall
    seconds}}} (kd/log.py's Clock)."""
    for name, row in rows.items():
        row["uses_teacher"] = None if name == "teacher" else next(s for s in cfg.stages if s.name == name).uses_teacher
    metrics.derive(rows, cfg.eval.batch_size)
    deploy_ratios(rows, cfg.eval.batch_size)
    report = {"meta": {"study": cfg.name, "dataset": cfg.data.dataset, "train_images": len(data.train),
                       "teacher_train_images": len(data.first(cfg.teacher.train.subset).train),
                       "student_train_images": len(data.first(cfg.train.subset).train),
                       "val_images": len(data.val), "test_images": len(data.test), "classes": list(data.classes),
                       "device": device_name(device),
                       "torch": torch.__version__, "eval_batch_size": cfg.eval.batch_size, "warmup": cfg.eval.warmup,
                       "repeats": cfg.eval.repeats,
                       "memory_method": "CUDA max_memory_allocated" if device.type == "cuda"
                       else "weights + input + peak live ATen tensor storage",
                       "date": datetime.datetime.now().isoformat(timespec="seconds"), **facts},
              "models": rows}
    write_text(run_dir / "report.json", json.dumps(report, indent=2) + "\n")
    text = markdown(report)
    write_text(run_dir / "report.md", f"# Distillation study `{cfg.name}`\n\n" + text)
    print("\n" + text)
    return report
