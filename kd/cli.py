"""Distill a ResNet-18 teacher into a small student and report what the compression costs.

    python run.py --config configs/fashion_mnist.yaml
    python run.py --config configs/cifar10.yaml --set train.epochs=5 --set data.batch_size=256 --device cuda
    torchrun --nproc_per_node 4 run.py --config configs/cifar10.yaml     # one process per GPU
    python run.py predict runs/cifar10/kd/best.pt cat.jpg dog.png        # or a model.onnx the study exported
    python run.py export runs/cifar10/kd/best.pt --int8 --images train/*.png

The run folder (<output_dir>/<name>/) holds the resolved config, per-stage checkpoints and metrics.csv,
report.json and report.md. Finished stages are reused when the study is run again; an interrupted stage
continues with --resume.
"""
import argparse
import os
import sys
from pathlib import Path

from kd.config import load_config
from kd.errors import ConfigError, KDError


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", help="study YAML file (see configs/ and docs/config.md)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, value parsed as YAML; repeatable "
                   "(e.g. train.epochs=5, stages.1.logit.temperature=2)")
    p.add_argument("--resume", action="store_true", help="continue unfinished stages from their last epoch checkpoint")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], help="overrides the config's device")
    p.add_argument("--profile", action="store_true", help="profile each model's last training epoch (host and GPU "
                   "time per operator) into profile.txt in its folder")
    p.add_argument("--list", action="store_true", help="list the registered datasets, models and distillation "
                   "methods with their parameters (with --config, its plugins' too), then exit")
    args = p.parse_args(argv)
    if not args.config and not args.list:
        p.error("--config is required")
    return args


def print_registries():
    from kd.data.datasets import DATASETS
    from kd.train.losses import FEATURE_LOSSES, LOGIT_LOSSES
    from kd.train.models import MODELS
    for title, registry in (("datasets (data.dataset)", DATASETS), ("models (teacher.name, student.name; "
                            "and any torchvision classifier by name)", MODELS), ("logit methods (stages[i].logit)",
                            LOGIT_LOSSES), ("feature methods (stages[i].features)", FEATURE_LOSSES)):
        print(f"{title}:")
        for line in registry.listing():
            print(f"  {line}")


def shutdown_distributed():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.destroy_process_group()


def predict_command(argv):
    p = argparse.ArgumentParser(prog="run.py predict", description="The most likely classes of image files, by a "
                                "checkpoint a study wrote (a stage's best.pt, a teacher) or an .onnx file it exported.")
    p.add_argument("model", help="best.pt, teacher checkpoint or .onnx file")
    p.add_argument("images", nargs="+", help="image files (any format PIL reads)")
    p.add_argument("--top", type=int, default=5, help="how many classes to print (default 5)")
    args = p.parse_args(argv)
    if args.top < 1:
        p.error("--top must be >= 1")
    from kd.deploy.predict import predict
    ok = True
    for good, line in predict(args.model, args.images, args.top):
        print(line, file=sys.stdout if good else sys.stderr)
        ok &= good
    return 0 if ok else 2


def export_command(argv):
    p = argparse.ArgumentParser(prog="run.py export", description="A checkpoint a study wrote (with its card) to ONNX, "
                                "checked against PyTorch; with --int8 also a post-training int8 copy.")
    p.add_argument("checkpoint", help="a stage's best.pt or a teacher checkpoint")
    p.add_argument("--out", help="the .onnx file (default: the checkpoint's path with .onnx)")
    p.add_argument("--images", nargs="+", default=[], help="image files to check the export on and calibrate int8")
    p.add_argument("--int8", action="store_true", help="also write <out>.int8.onnx, calibrated on --images")
    args = p.parse_args(argv)
    if args.int8 and not args.images:
        p.error("--int8 needs --images: training images to calibrate its activation ranges")
    from kd.deploy.export import export_checkpoint
    out = Path(args.out or Path(args.checkpoint).with_suffix(".onnx"))
    for line in export_checkpoint(Path(args.checkpoint), out, args.images, args.int8):
        print(line)
    return 0


COMMANDS = {"predict": predict_command, "export": export_command}


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in COMMANDS:
        try:
            return COMMANDS[argv[0]](argv[1:])
        except KDError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        except ImportError as e:  # onnx, onnxruntime: needed for ONNX files only
            print(f"error: run.py {argv[0]} needs onnx, onnxscript and onnxruntime (Pipfile.lock pins them): {e}",
                  file=sys.stderr)
            return 2
    args = parse_args(argv)
    try:
        overrides = args.set + ([f"device={args.device}"] if args.device else [])
        cfg = load_config(args.config, overrides) if args.config else None
        if args.list:
            print_registries()
            return 0
        from kd.study.study import Study  # after validation: torch's import cost is not paid for a bad config
        Study(cfg, resume=args.resume, profile=args.profile).run()
        shutdown_distributed()
    except KDError as e:  # a ConfigError found while building data and models names the file as load_config does
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process stops; one says why
            print(f"error: {args.config}: {e}" if isinstance(e, ConfigError) else f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("\ninterrupted: finished stages and epoch checkpoints are kept; rerun with --resume to continue",
              file=sys.stderr)
        return 130
    return 0
