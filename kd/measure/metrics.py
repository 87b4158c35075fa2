"""Every figure a study reports, defined once: its key in report.json, how it is measured or derived, how a stage's
seeds combine, and its column. The report's tables, the ratios against the teacher and the mean over seeds are
all read from METRICS, so a new figure is one `Metric` added here (or registered by a plugin)."""
import statistics
from collections.abc import Callable
from dataclasses import dataclass

MB = 2 ** 20


@dataclass(frozen=True)
class Metric:
    """`key` and `title` may hold `{b}`, the evaluation batch size. A metric is measured on every model
    (`measure`), derived from other figures of the row (`derive`), or recorded by training or evaluation."""
    key: str
    title: str = ""  # its column; "" keeps it to report.json
    table: str = "models"  # "models": every model's row; "training": the students' table
    cell: Callable[[dict, str], str] | None = None  # (row, key) -> text; default: the value, 4 significant digits
    over_seeds: bool = False  # a stage's figure is the mean over its seeds, with the sample std as `<key>_std`
    measure: Callable | None = None  # (model, image_shape, device) -> value: inference, on every model
    derive: Callable | None = None  # (row, teacher, baseline, b) -> value, or None: nothing to compare

    def keys(self, b):
        return self.key.format(b=b)

    def text(self, row, b):
        key = self.keys(b)
        return self.cell(row, key) if self.cell else f"{row[key]:.4g}"


def pct(row, key):
    """A percentage, with its seed-to-seed standard deviation when the stage ran several seeds."""
    text = f"{100 * row[key]:.2f}"
    return text + f" ± {100 * row[f'{key}_std']:.2f}" if len(row.get("seeds", ())) > 1 else text


def timing(digits):
    """A latency cell: median (p90) in ms."""
    return lambda r, k: f"{r[k]:.{digits}f} ({r[k.replace('_ms', '_p90_ms')]:.{digits}f})"


def ratio(key):
    """The teacher's figure over the model's: how much faster or smaller the model is."""
    return lambda r, t, base, b: t[key.format(b=b)] / r[key.format(b=b)]


def optional(fmt):
    return lambda r, k: fmt(r[k]) if r.get(k) else "-"


METRICS = [
    Metric("val_top1", "val top-1", cell=pct, over_seeds=True),
    Metric("test_top1", "test top-1", cell=pct, over_seeds=True),
    Metric("test_top5", "test top-5", cell=lambda r, k: "-" if r[k] is None else f"{100 * r[k]:.2f}",
           over_seeds=True),
    Metric("test_loss", over_seeds=True),
    Metric("top1_gap_vs_teacher", "gap vs teacher (pp)", cell=lambda r, k: f"{100 * r[k]:+.2f}",
           derive=lambda r, t, base, b: t["test_top1"] - r["test_top1"]),
    Metric("params", "params", cell=lambda r, k: f"{r[k] / 1e6:.3f}M"),
    Metric("checkpoint_bytes", "checkpoint MB", cell=lambda r, k: f"{r[k] / MB:.2f}"),
    Metric("macs", "MMACs/img", cell=lambda r, k: f"{r[k] / 1e6:.1f}"),
    Metric("latency_b1_ms", "latency b1 ms (p90)", cell=timing(2)),
    Metric("latency_b{b}_ms", "latency b{b} ms (p90)", cell=timing(1)),
    Metric("images_per_s_b{b}", "img/s b{b}", cell=lambda r, k: f"{r[k]:.0f}"),
    Metric("peak_memory_bytes", "peak MB b{b}", cell=lambda r, k: f"{r[k] / MB:.1f}"),
    Metric("speedup_b1", derive=ratio("latency_b1_ms")),
    Metric("speedup_b{b}", "speed-up b1 / b{b}", derive=ratio("latency_b{b}_ms"),
           cell=lambda r, k: f"{r['speedup_b1']:.1f}x / {r[k]:.1f}x"),
    Metric("param_reduction", derive=ratio("params")),
    Metric("mac_reduction", derive=ratio("macs")),
    Metric("memory_reduction", "params / MACs / memory reduction", derive=ratio("peak_memory_bytes"),
           cell=lambda r, k: f"{r['param_reduction']:.1f}x / {r['mac_reduction']:.1f}x / {r[k]:.1f}x"),
    Metric("seeds", "seeds", table="training", cell=lambda r, k: ", ".join(map(str, r[k]))),
    Metric("val_top1", "val top-1", table="training", cell=pct),
    Metric("test_top1", "test top-1", table="training", cell=pct),
    Metric("top1_gain_vs_baseline", "gain vs baseline (pp)", table="training",
           cell=lambda r, k: f"{100 * r[k]:+.2f}" if k in r else "-",
           derive=lambda r, t, base, b: None if base is None else r["test_top1"] - base["test_top1"]),
    Metric("train_images_per_s", "train img/s", table="training", cell=optional(lambda v: f"{v:.0f}"),
           over_seeds=True),
    Metric("epoch_seconds", "epoch s", table="training", cell=optional(lambda v: f"{v:.1f}"), over_seeds=True),
    Metric("method_state_bytes", "method params (state MB)", table="training",
           cell=lambda r, k: f"{r.get('method_params', 0):,} ({r.get(k, 0) / MB:.2f})"),
]


def register(metric):
    """Add a figure to every report from now on (a plugin's, or a test's)."""
    METRICS.append(metric)
    return metric


def measured(model, image_shape, device):
    """The figures of METRICS that are measured on a model, beside evaluate.profile's."""
    return {m.key: m.measure(model, image_shape, device) for m in METRICS if m.measure}


def derive(rows, b):
    """The derived figures of every row, against the teacher's row and the first teacher-free stage's (the
    baseline's); a derivation that has nothing to compare with leaves its key out."""
    teacher = rows["teacher"]
    baseline = next((r for n, r in rows.items() if n != "teacher" and r.get("uses_teacher") is False), None)
    for m in METRICS:
        if m.derive:
            for row in rows.values():
                value = m.derive(row, teacher, baseline, b)
                if value is not None:
                    row[m.keys(b)] = value


def over_seeds(rows, seeds):
    """One stage's row over its seeds: the first seed's (its checkpoint is the one measured for inference), with
    the mean and sample standard deviation of every `over_seeds` figure, and every seed's own figures."""
    summary = dict(rows[0])
    for key in dict.fromkeys(m.key for m in METRICS if m.over_seeds):
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            summary[key] = statistics.fmean(values)
            summary[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    summary["seeds"] = {seed: {k: r.get(k) for k in ("val_top1", "test_top1", "best_epoch")}
                        for seed, r in zip(seeds, rows)}
    return summary


def table(name_title, rows, metrics, b):
    cols = [name_title] + [m.title.format(b=b) for m in metrics]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    return lines + ["| " + " | ".join([n] + [m.text(r, b) for m in metrics]) + " |" for n, r in rows.items()]


def tables(models, b):
    """The report's two tables: every model's figures, and the students' training."""
    shown = lambda where: [m for m in METRICS if m.title and m.table == where]
    students = {n: r for n, r in models.items() if n != "teacher"}
    return table("model", models, shown("models"), b), table("student", students, shown("training"), b)
