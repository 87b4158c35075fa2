"""Benchmark: what distillation costs compared with training the student alone.

    python bench.py --config configs/fashion_mnist.yaml [--epochs 2] [--seeds 0 1] [--set key=value ...]
                    [--stage NAME] [--variants alone live ...] [--modes off reduce-overhead ...] [--profile]
    python bench.py --config configs/fashion_mnist.yaml --formats [--compile]
    python bench.py --config configs/fashion_mnist.yaml --loader

In one process, with the config's recipe and the same seed, the student is trained:
  alone         labels only, tensor pipeline
  alone_loader  labels only, torch DataLoader with per-image transforms (one epoch: pipeline throughput only)
  live          distilled with the teacher's forward pass on every step (what torchdistill, mdistiller do)
  cached        distilled from the teacher-output cache, built first in a fresh folder (its cost is reported apart),
                in the config's cache.mode (a feature stage under `logits` runs its teacher up to its layers)
using the first stage with a logit method (or --stage), for each train.compile mode in --modes (default: the
config's); and on request (not by default)
  teacher       a fresh teacher on its own recipe (teacher.train) for the students' number of epochs.
Throughput is whole training epochs (data, augmentation, teacher or cache lookup, forward, backward, step),
validation excluded: the mean over epochs, and the last epoch's alone (steady state: compiling happens in
the first). The teacher checkpoint must exist (run the study first) unless teacher.train.epochs is 0, which times an
untrained teacher: its forward pass costs the same. Results go to <output_dir>/<name>_bench/
(bench.md, bench.json) and are printed. --profile also profiles each run's last epoch (torch.profiler: wall and
GPU-busy milliseconds per step, the operators that cost most on the host and on the GPU) into its folder's
profile.txt.

--formats instead times the forward-pass options on the config's models and batch size: the teacher's
inference (what building the cache or a live teacher costs) and one student training step, in fp32 and bf16
autocast, contiguous and channels_last (and torch.compile with --compile), on random inputs already on the
device; median of timed repeats after warm-up. Results go to <output_dir>/<name>_bench/formats.md.

--loader instead times the data pipeline alone (the config's data, batch size and augmentation). The tensor
pipeline: wall milliseconds and operator calls per training batch, on the config's device and on `meta`, where
every operator is dispatched but computes nothing (what issuing them costs the host, the bound of a small model's
step on a GPU). A DataLoader over streamed files (imagenet above 64 px): decoded and augmented images per second,
and per worker process. Results go to <output_dir>/<name>_bench/loader.md.
"""
import argparse
import csv
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

from kd.config import COMPILE_MODES, load_config
from kd.data.datasets import train_loader
from kd.data.tensors import TensorLoader
from kd.device import autocast, resolve_recipe, synchronize
from kd.errors import ConfigError, KDError
from kd.measure.evaluate import timed
from kd.measure.report import device_name
from kd.store import BEST, METRICS
from kd.train.distiller import Distiller
from kd.train.trainer import Run, make_optimizer

VARIANTS = ("alone", "alone_loader", "live", "cached", "teacher")
STUDENT_VARIANTS = VARIANTS[:-1]  # the default: what distillation costs against the student alone


def positive(text):
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be a whole number >= 1, got {text!r}")
    return int(text)


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as in run.py")
    p.add_argument("--stage", help="the distillation stage to time (default: the first with a logit method)")
    p.add_argument("--epochs", type=int, help="override train.epochs for every variant")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to repeat live and cached over (default: the config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(STUDENT_VARIANTS),
                   help="what to train (default: every student variant)")
    p.add_argument("--modes", nargs="+", choices=COMPILE_MODES,
                   help="train.compile modes to time (default: the config's)")
    p.add_argument("--profile", action="store_true",
                   help="profile each run's last epoch into its folder's profile.txt (host and GPU time per operator)")
    p.add_argument("--formats", action="store_true", help="time fp32/bf16, channels_last (and --compile) instead")
    p.add_argument("--compile", action="store_true", help="with --formats: also time torch.compile'd models")
    p.add_argument("--repeats", type=positive, default=10, help="with --formats: timed repeats per variant")
    p.add_argument("--loader", action="store_true", help="time the tensor pipeline's batches instead")
    return p.parse_args(argv)


def bench_config(args):
    """The config, its study renamed `<name>_bench` with a fresh cache (so its build is timed) in the mode the
    cached variant replays, and the stage to time."""
    overrides = args.set + ([f"device={args.device}"] if args.device else []) + \
        ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    cfg = load_config(args.config, overrides)
    stages = [s for s in cfg.stages if s.logit is not None and (args.stage is None or s.name == args.stage)]
    if not stages:
        raise ConfigError("--stage", f"no stage with a logit method named {args.stage or '(any)'} in {args.config}")
    name = f"{cfg.name}_bench"
    cache = dataclasses.replace(cfg.cache, dir=str(Path(cfg.output_dir) / name / "cache"),
                                mode=cache_mode(cfg, stages[0]))
    return dataclasses.replace(cfg, name=name, cache=cache), stages[0]


def cache_mode(cfg, stage):
    """What the cached variant replays: the config's cache.mode (under `logits` a feature stage runs its teacher
    cut after the layers it matches), or with the cache off everything the stage uses."""
    if cfg.cache.mode != "off":
        return cfg.cache.mode
    return "logits+features" if stage.features else "logits"


def train_variant(study, variant, stage, seed, mode, cache=None):
    """Train one fresh student of `seed` (`stage` None: labels only; variant "teacher": a fresh teacher on its
    recipe, labels only) with `mode` as its compile mode, resolved as the study resolves its recipes; return its
    training throughput (mean over epochs, and the last epoch's), test accuracy and, when the study profiles, its
    last epoch's profile (the file's first line)."""
    s = study.setting
    name = f"{variant}_{mode}_s{seed}"
    base, model_cfg, config_key = (s.runtime.teacher, s.cfg.teacher, "teacher") if variant == "teacher" \
        else (s.runtime.student, s.cfg.student, "student")
    epochs = s.cfg.train.epochs
    train_cfg = dataclasses.replace(base.cfg, compile=mode, epochs=epochs,
                                    warmup_epochs=min(base.cfg.warmup_epochs, epochs))
    recipe = resolve_recipe(base.key, train_cfg, s.device, s.runtime.world > 1)
    distiller = Distiller(s.new_model(model_cfg, config_key, seed), label_smoothing=train_cfg.label_smoothing) \
        if stage is None else study.students.distiller(stage, seed, cache)
    trained = s.train(distiller, recipe, Run(name, s.folder.model(name), name, seed),
                      views=s.cfg.cache.views if cache else None)
    result = s.evaluate(name, distiller.student, name, f"{name}/{BEST}", trained)
    with open(s.folder.model(name) / METRICS) as f:
        last = list(csv.DictReader(f))[-1]
    profiled = s.folder.model(name) / "profile.txt"
    return {"variant": variant, "compile": mode, "graph": recipe.graph, "seed": seed,
            "epoch_seconds": trained["epoch_seconds"], "images_per_s": trained["train_images_per_s"],
            "last_images_per_s": float(last["train_images_per_s"]), "test_top1": result.test_top1,
            "profile": f"{name}/profile.txt: {profiled.read_text().splitlines()[0]}" if s.profile else None}


def run(cfg, stage, seeds, variants, modes, profile=False):
    """Students of each seed share the study's teacher, augmentation and so its cache, built (and timed) once."""
    from kd.study.study import Study
    if not os.path.exists(cfg.teacher.checkpoint) and cfg.teacher.train.epochs > 0:
        raise ConfigError("teacher.checkpoint", f"{cfg.teacher.checkpoint} does not exist; run the study first, or "
                          "time an untrained teacher (teacher.train.epochs=0: its forward pass costs the same)")
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the benchmark always starts clean
    try:
        study = Study(cfg, profile=profile)
    except ConfigError as e:
        if e.key != "cache.mode":
            raise
        # bench.py, not the config, asked for the cache: say what in the config stands in its way
        raise ConfigError("data.pipeline", f"bench.py times distillation from the teacher cache, which replays "
                          f"augmentations drawn from (seed, view, index): an in-memory dataset or streamed imagenet "
                          f"crops, in one process; '{cfg.data.dataset}' with pipeline '{cfg.data.pipeline}' has "
                          "neither") from None
    study.teacher.obtain()
    rows, build = [], None
    for mode in modes:
        if "teacher" in variants:
            rows.append(train_variant(study, "teacher", None, seeds[0], mode))
        if "alone" in variants:
            rows.append(train_variant(study, "alone", None, seeds[0], mode))
        if "alone_loader" in variants:
            loader_study = Study(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pipeline="loader"),
                                                     train=dataclasses.replace(cfg.train, epochs=1),
                                                     cache=dataclasses.replace(cfg.cache, mode="off")),
                                 profile=profile)
            rows.append({**train_variant(loader_study, "alone_loader", None, seeds[0], mode), "test_top1": None})
        for seed in seeds:
            if "live" in variants:
                rows.append(train_variant(study, "live", stage, seed, mode))
            if "cached" in variants:
                if build is None:
                    start = time.perf_counter()
                    study.students.cache()
                    build = time.perf_counter() - start
                rows.append(train_variant(study, "cached", stage, seed, mode, study.students.cache()))
    return study, rows, build


def summarize(study, stage, rows, build):
    s = study.setting
    seeds = sorted({r["seed"] for r in rows})
    lines = [f"Benchmark of stage `{stage.name}` ({s.cfg.train.epochs} epochs, "
             f"{len(s.student_data.train)} training images, seeds {seeds}) on {device_name(s.device)}, "
             f"torch {torch.__version__}; graph: the step in one CUDA graph (train.graph {s.cfg.train.graph}).", "",
             "| variant | train.compile | graph | epoch s | images/s | last epoch images/s | epoch time vs alone | "
             "test top-1 |", "|---|---|---|---|---|---|---|---|"]
    mean = lambda runs, key: statistics.fmean(r[key] for r in runs)
    notes = []
    for mode in dict.fromkeys(r["compile"] for r in rows):
        by = {v: [r for r in rows if r["variant"] == v and r["compile"] == mode] for v in VARIANTS}
        by = {v: runs for v, runs in by.items() if runs}
        alone = mean(by["alone"], "epoch_seconds") if "alone" in by else None
        for variant, runs in by.items():
            tops = [r["test_top1"] for r in runs if r["test_top1"] is not None]
            acc = "-" if not tops else f"{100 * statistics.fmean(tops):.2f}" + (
                f" +- {100 * statistics.stdev(tops):.2f}" if len(tops) > 1 else "")
            epoch = mean(runs, "epoch_seconds")
            ratio = f"{epoch / alone:.2f}x" if alone else "-"
            graph = "/".join(dict.fromkeys("on" if r["graph"] else "off" for r in runs))
            lines.append(f"| {variant} | {mode} | {graph} | {epoch:.1f} | {mean(runs, 'images_per_s'):.0f} | "
                         f"{mean(runs, 'last_images_per_s'):.0f} | {ratio} | {acc} |")
        ratios = []
        if alone and "live" in by:
            ratios.append(f"live / alone (b/a): {mean(by['live'], 'epoch_seconds') / alone:.2f}x")
        if alone and "cached" in by:
            ratios.append(f"cached / alone (c/a): {mean(by['cached'], 'epoch_seconds') / alone:.2f}x")
        if "live" in by and "cached" in by:
            ratios.append(f"live / cached (b/c): "
                          f"{mean(by['live'], 'epoch_seconds') / mean(by['cached'], 'epoch_seconds'):.2f}x")
        if alone and "alone_loader" in by:
            ratios.append(f"student alone, DataLoader epoch / tensor-pipeline epoch: "
                          f"{by['alone_loader'][0]['epoch_seconds'] / alone:.2f}x")
        if ratios:
            notes.append(f"- compile {mode}: " + "; ".join(ratios))
    lines += [""] + notes + [f"- profile {r['profile']}" for r in rows if r.get("profile")]
    if build is not None:
        lines.append(f"- cache build (one-off, {s.cfg.cache.views} views, mode {s.cfg.cache.mode}): {build:.1f} s")
    return "\n".join(lines) + "\n"


def formats(cfg, compile_too, repeats):
    """Images/s of teacher inference and of a student training step for each precision and memory format."""
    from kd.study.setting import Setting
    setting = Setting(cfg)
    device, batch = setting.device, cfg.data.batch_size
    x = torch.randn(batch, *setting.image_shape, device=device)
    y = torch.randint(0, setting.data.num_classes, (batch,), device=device)
    rows = []
    for amp in ("off", "bf16"):
        for channels_last in (False, True):
            for compiled in (False, True) if compile_too else (False,):
                fmt = torch.channels_last if channels_last else torch.contiguous_format
                teacher = setting.new_model(cfg.teacher, "teacher").to(device, memory_format=fmt).eval()
                student = setting.new_model(cfg.student, "student").to(device, memory_format=fmt).train()
                run_teacher, run_student = (torch.compile(teacher), torch.compile(student)) if compiled \
                    else (teacher, student)
                xf = x.contiguous(memory_format=fmt)

                def infer():
                    with torch.inference_mode(), autocast(device, amp):
                        run_teacher(xf)

                def train_step(optimizer):
                    with autocast(device, amp):
                        loss = torch.nn.functional.cross_entropy(run_student(xf).float(), y)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    optimizer.step()
                warmup = 3 if compiled else 2  # the first compiled calls compile
                rate = lambda fn: batch / statistics.median(timed(fn, device, warmup, repeats))
                rows.append({"amp": amp, "channels_last": channels_last, "compile": compiled,
                             "teacher_infer_images_per_s": rate(infer)})
                for fused, key in ((False, "student_train_images_per_s"), (True, "student_train_fused_images_per_s")):
                    optimizer = make_optimizer(student.parameters(), cfg.train, fused)  # the recipe's, as trained
                    rows[-1][key] = rate(lambda: train_step(optimizer))
                print(rows[-1])
    base = rows[0]
    lines = [f"Forward-pass options at batch {batch} on {device_name(device)}, torch {torch.__version__}; "
             f"{cfg.teacher.name} teacher inference and {cfg.student.name} student training step (the recipe's "
             f"optimizer, default and fused), input {tuple(setting.image_shape)}, median of {repeats} repeats.", "",
             "| amp | channels_last | compile | teacher infer img/s | vs fp32 | student train img/s | vs fp32 | "
             "fused optimizer img/s | vs fp32 |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t, s, f = (r["teacher_infer_images_per_s"], r["student_train_images_per_s"],
                   r["student_train_fused_images_per_s"])
        s0 = base["student_train_images_per_s"]
        lines.append(f"| {r['amp']} | {r['channels_last']} | {r['compile']} | {t:.0f} | "
                     f"{t / base['teacher_infer_images_per_s']:.2f}x | {s:.0f} | {s / s0:.2f}x | {f:.0f} | "
                     f"{f / s0:.2f}x |")
    return rows, "\n".join(lines) + "\n"


def loader(cfg, epochs=3):
    """Wall ms and operator calls per training batch of the tensor pipeline, per device: the mean of `epochs` epochs
    after a first one (warm-up)."""
    from kd.study.setting import Setting
    setting = Setting(cfg)
    if not setting.data.tensors:
        return streamed(setting, epochs)
    images, labels = setting.data.tensors["train"]
    lines = [f"Tensor pipeline, {len(labels)} training images, batch {cfg.data.batch_size}, augmentation "
             f"{dataclasses.asdict(cfg.data.augment)}, torch {torch.__version__}; the mean of {epochs} epochs after "
             "a first.", "", "| device | ms per batch | operator calls per batch |", "|---|---|---|"]
    rows = []
    for device in (setting.device, torch.device("meta")):
        batches = TensorLoader(images.to(device), labels.to(device), cfg.data.batch_size, shuffle=True,
                               drop_last=True, seed=cfg.seed, augment_cfg=cfg.data.augment, mean=setting.data.mean,
                               std=setting.data.std, device=device)
        seconds = pass_seconds(batches, epochs + 1, device)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as p:
            for _ in batches:
                pass
        calls = sum(op.count for op in p.key_averages() if op.key.startswith("aten::")) / len(batches)
        rows.append({"device": str(device), "ms_per_batch": 1000 * statistics.fmean(seconds[1:]) / len(batches),
                     "operator_calls_per_batch": calls})
        name = device_name(device) if device.type != "meta" else "meta (dispatch, no arithmetic)"
        lines.append(f"| {name} | {rows[-1]['ms_per_batch']:.2f} | {calls:.1f} |")
    return rows, "\n".join(lines) + "\n"


def pass_seconds(batches, epochs, device):
    """Wall seconds of each of `epochs` passes over a training loader, doing nothing with its batches."""
    seconds = []
    for epoch in range(epochs):
        batches.set_epoch(epoch)
        start = time.perf_counter()
        for _ in batches:
            pass
        synchronize(device)
        seconds.append(time.perf_counter() - start)
    return seconds


def streamed(setting, epochs):
    """Decoded and augmented training images per second of the DataLoader pipeline (files read, decoded, cropped,
    flipped and normalised in data.num_workers worker processes), and per worker: the mean of `epochs` epochs of
    the training split after a first (warm-up)."""
    cfg, data = setting.cfg, setting.data
    batches = train_loader(data, cfg.data, torch.device("cpu"), cfg.seed)
    seconds = pass_seconds(batches, epochs + 1, torch.device("cpu"))
    n = len(batches) * cfg.data.batch_size
    per_s = n / statistics.fmean(seconds[1:])
    workers = cfg.data.num_workers
    lines = [f"DataLoader pipeline, {len(data.train)} training images read from files ({cfg.data.dataset}, "
             f"{data.image_size} px crops), batch {cfg.data.batch_size}, {workers} worker processes, "
             f"{os.cpu_count()} CPUs, torch {torch.__version__}; the mean of {epochs} epochs after a first.", "",
             "| images/s | images/s per worker | ms per batch |", "|---|---|---|",
             f"| {per_s:.0f} | {per_s / max(workers, 1):.0f} | {1000 * cfg.data.batch_size / per_s:.1f} |"]
    row = {"images_per_s": per_s, "workers": workers, "images_per_s_per_worker": per_s / max(workers, 1)}
    return [row], "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, stage = bench_config(args)
        if args.formats or args.loader:
            rows, text = formats(cfg, args.compile, args.repeats) if args.formats else loader(cfg)
            cfg.run_dir.mkdir(parents=True, exist_ok=True)
            what = "formats" if args.formats else "loader"
            (cfg.run_dir / f"{what}.json").write_text(json.dumps(rows, indent=2) + "\n")
            (cfg.run_dir / f"{what}.md").write_text(text)
            print("\n" + text)
            return 0
        study, rows, build = run(cfg, stage, args.seeds or [cfg.seed], args.variants, args.modes or [cfg.train.compile],
                                 args.profile)
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = summarize(study, stage, rows, build)
    (cfg.run_dir / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (cfg.run_dir / "bench.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
