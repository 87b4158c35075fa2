"""Benchmark: what distillation costs compared with training the student alone.

    python bench.py --config configs/fashion_mnist.yaml [--epochs 2] [--seeds 0 1] [--set key=value ...]

In one process, with the config's recipe and the same seed, the student is trained:
  alone         labels only, tensor pipeline
  alone_loader  labels only, torch DataLoader with per-image transforms (one epoch: pipeline throughput only)
  live          distilled with the teacher's forward pass on every step (what torchdistill, mdistiller do)
  cached        distilled from the teacher-output cache, built first in a fresh folder (its cost is reported apart)
using the first stage with a logit method (or --stage). Throughput is whole training epochs (data, augmentation,
teacher or cache lookup, forward, backward, step), validation excluded. The teacher checkpoint must exist: run
the study first. Results go to <output_dir>/<name>_bench/ (bench.md, bench.json) and are printed.
"""
import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import time

import torch

from kd.config import load_config
from kd.distiller import Distiller
from kd.registry import ConfigError, KDError
from kd.report import device_name


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True)
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="config override, as in run.py")
    p.add_argument("--stage", help="the distillation stage to time (default: the first with a logit method)")
    p.add_argument("--epochs", type=int, help="override train.epochs for every variant")
    p.add_argument("--seeds", type=int, nargs="+", help="seeds to repeat live and cached over (default: the config's)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"])
    return p.parse_args(argv)


def bench_config(args):
    overrides = args.set + ([f"device={args.device}"] if args.device else []) + \
        ([f"train.epochs={args.epochs}"] if args.epochs is not None else [])
    cfg = load_config(args.config, overrides)
    stages = [s for s in cfg.stages if s.logit is not None and (args.stage is None or s.name == args.stage)]
    if not stages:
        raise ConfigError("--stage", f"no stage with a logit method named {args.stage or '(any)'} in {args.config}")
    if cfg.cache.mode == "off":
        cfg.cache.mode = "logits+features" if stages[0].features else "logits"
    cfg.name = f"{cfg.name}_bench"
    cfg.cache.dir = str(cfg.run_dir / "cache")  # a fresh cache, so its build is timed
    return cfg, stages[0]


def train_variant(study, name, stage, cache=None):
    """Train one fresh student (`stage` None: labels only); return its training throughput and test accuracy."""
    student = study.new_model(study.cfg.student, "student")
    if stage is None:
        distiller = Distiller(student, label_smoothing=study.cfg.train.label_smoothing)
    else:
        distiller = Distiller.build(stage, student, study.teacher, study.sample, study.cfg.train.label_smoothing, name)
    info = study.fit(name, distiller, study.cfg.train, key=name, cache=cache)
    result = study.finish(name, distiller.student, name, info)
    return {"epoch_seconds": info["epoch_seconds"], "images_per_s": info["train_images_per_s"],
            "test_top1": result["test_top1"]}


def run(cfg, stage, seeds):
    from kd.study import Study
    if not os.path.exists(cfg.teacher.checkpoint):
        raise ConfigError("teacher.checkpoint", f"{cfg.teacher.checkpoint} does not exist; run the study first")
    shutil.rmtree(cfg.run_dir, ignore_errors=True)  # the benchmark always starts clean
    rows = []
    for seed in seeds:
        cfg.seed = seed
        study = Study(cfg)
        study.obtain_teacher()
        study.teacher.to(study.device).requires_grad_(False)
        if seed == seeds[0]:
            rows.append({"variant": "alone", "seed": seed, **train_variant(study, f"alone_s{seed}", None)})
            loader_cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, pipeline="loader"),
                                             train=dataclasses.replace(cfg.train, epochs=1),
                                             cache=dataclasses.replace(cfg.cache, mode="off"))
            loader_study = Study(loader_cfg)
            rows.append({"variant": "alone_loader", "seed": seed,
                         **train_variant(loader_study, f"alone_loader_s{seed}", None), "test_top1": None})
        rows.append({"variant": "live", "seed": seed, **train_variant(study, f"live_s{seed}", stage)})
        start = time.perf_counter()
        cache = study.teacher_cache()
        build = time.perf_counter() - start
        rows.append({"variant": "cached", "seed": seed, "cache_build_seconds": build,
                     **train_variant(study, f"cached_s{seed}", stage, cache)})
    return study, rows


def summarize(study, stage, rows):
    alone = next(r for r in rows if r["variant"] == "alone")
    by = {v: [r for r in rows if r["variant"] == v] for v in ("alone", "alone_loader", "live", "cached")}
    lines = [f"Benchmark of stage `{stage.name}` ({study.cfg.train.epochs} epochs, {len(study.data.train)} training "
             f"images, seeds {sorted({r['seed'] for r in rows})}) on {device_name(study.device)}, torch "
             f"{torch.__version__}.", "",
             "| variant | epoch s | images/s | epoch time vs alone | test top-1 |", "|---|---|---|---|---|"]
    for variant, runs in by.items():
        tops = [r["test_top1"] for r in runs if r["test_top1"] is not None]
        acc = "-" if not tops else f"{100 * statistics.fmean(tops):.2f}" + (
            f" +- {100 * statistics.stdev(tops):.2f}" if len(tops) > 1 else "")
        epoch = statistics.fmean(r["epoch_seconds"] for r in runs)
        lines.append(f"| {variant} | {epoch:.1f} | {statistics.fmean(r['images_per_s'] for r in runs):.0f} | "
                     f"{epoch / alone['epoch_seconds']:.2f}x | {acc} |")
    live = statistics.fmean(r["epoch_seconds"] for r in by["live"])
    cached = statistics.fmean(r["epoch_seconds"] for r in by["cached"])
    build = statistics.fmean(r["cache_build_seconds"] for r in by["cached"])
    loader = by["alone_loader"][0]["epoch_seconds"]
    lines += ["", f"- live / alone (b/a): {live / alone['epoch_seconds']:.2f}x; cached / alone (c/a): "
                  f"{cached / alone['epoch_seconds']:.2f}x; live / cached (b/c): {live / cached:.2f}x",
              f"- cache build (one-off, {study.cfg.cache.views} views, mode {study.cfg.cache.mode}): {build:.1f} s",
              f"- student alone, DataLoader epoch / tensor-pipeline epoch: {loader / alone['epoch_seconds']:.2f}x"]
    return "\n".join(lines) + "\n"


def main(argv=None):
    args = parse_args(argv)
    try:
        cfg, stage = bench_config(args)
        study, rows = run(cfg, stage, args.seeds or [cfg.seed])
    except ConfigError as e:
        print(f"error: {args.config}: {e}", file=sys.stderr)
        return 2
    except KDError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    text = summarize(study, stage, rows)
    (cfg.run_dir / "bench.json").write_text(json.dumps(rows, indent=2) + "\n")
    (cfg.run_dir / "bench.md").write_text(text)
    print("\n" + text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
