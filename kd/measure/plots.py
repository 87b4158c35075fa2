"""Pictures of a finished study, written beside its report: accuracy against batch-1 latency (one point per model
and runtime), and the training curves of every model, as their results record them. matplotlib, headless."""
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the headless backend)

from kd.log import info  # noqa: E402
from kd.store import atomic, read_json  # noqa: E402

MARKERS = {"pytorch": "o", "onnxruntime": "s", "onnxruntime-int8": "^"}


def points(report):
    """(model index, model, runtime, batch-1 latency ms, test top-1 %, its standard deviation over seeds or 0):
    every model in every runtime of the deployment table (batch 1 on one CPU thread; each stage's first seed), or
    without one, every model in PyTorch on the study's device (a stage's mean over its seeds)."""
    return [(i, name, runtime, r["latency_b1_ms"], 100 * r["test_top1"], 100 * r.get("test_top1_std", 0.0))
            for i, (name, row) in enumerate(report["models"].items())
            for runtime, r in (row.get("deploy") or {"pytorch": row}).items()]


def accuracy_vs_latency(report):
    fig, ax = plt.subplots(figsize=(7, 4.5))
    spread = False
    for i, name, runtime, ms, top1, std in points(report):
        ax.errorbar(ms, top1, yerr=std or None, fmt=MARKERS.get(runtime, "o"), markersize=8, capsize=4,
                    label=f"{name} ({runtime})", color=f"C{i % 10}")
        spread = spread or std > 0
    ax.set_xscale("log")
    ax.set_xlabel("batch-1 latency, ms (log scale)" + (", one CPU thread" if report["meta"].get("deploy") else ""))
    ax.set_ylabel("test top-1, %" + (" (mean ± std over seeds)" if spread else ""))
    ax.set_title(f"{report['meta']['study']}: accuracy against latency")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    return fig


def curves(run_dir, names):
    """{label: [(epoch, train loss, val top-1 %)]} from each model's result.json in the run folder (several seeds:
    their mean per epoch): the curve its training recorded, under the result's digest, so a metrics.csv edited or
    copied from elsewhere changes nothing drawn. A result without one (made before results held curves) is named."""
    out = {}
    for name in names:
        files = sorted(Path(run_dir, name).glob("**/result.json"))
        runs = [read_json(f, "run the study again to measure it anew")["training"].get("curve") for f in files]
        if not runs or not all(run and run["epoch"] for run in runs):
            info(f"[plots] {name}: no training curve recorded in its result.json; left out of training_curves.png")
            continue
        epochs = min(len(run["epoch"]) for run in runs)
        mean = lambda e, key: statistics.fmean(run[key][e] for run in runs)
        label = name if len(runs) == 1 else f"{name} (mean of {len(runs)} seeds)"
        out[label] = [(runs[0]["epoch"][e], mean(e, "train_loss"), 100 * mean(e, "val_top1")) for e in range(epochs)]
    return out


def training_curves(run_dir, names):
    fig, (loss_ax, acc_ax) = plt.subplots(1, 2, figsize=(10, 4))
    for label, rows in curves(run_dir, names).items():
        epochs, loss, acc = zip(*rows)
        loss_ax.plot(epochs, loss, marker=".", label=label)
        acc_ax.plot(epochs, acc, marker=".", label=label)
    loss_ax.set(xlabel="epoch", ylabel="training loss (each model's own objective)", yscale="log")
    acc_ax.set(xlabel="epoch", ylabel="validation top-1, %")
    for ax in (loss_ax, acc_ax):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def save(fig, path):
    with atomic(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def write_plots(run_dir, report):
    """accuracy_vs_latency.png and training_curves.png in the run folder; their paths."""
    paths = [Path(run_dir) / "accuracy_vs_latency.png", Path(run_dir) / "training_curves.png"]
    save(accuracy_vs_latency(report), paths[0])
    save(training_curves(run_dir, list(report["models"])), paths[1])
    return paths
