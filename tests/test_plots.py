"""The pictures of a study: one point per model and runtime, one curve per model, drawn from what the results
record (under their digest), never from files a user can edit or copy over."""
import pytest
from PIL import Image

import kd.store
from kd.measure import plots


def store_curve(folder, losses, accs):
    """A result.json whose training recorded these per-epoch losses and validation accuracies."""
    curve = {"epoch": list(range(1, len(losses) + 1)), "train_loss": list(losses), "val_top1": list(accs)}
    folder.mkdir(parents=True)
    kd.store.write_json(folder / "result.json", {"training": {"curve": curve}})


def test_plots_hold_one_point_per_model_and_runtime_and_one_curve_per_model(tmp_path):
    scales = (("pytorch", 1, 0), ("onnxruntime", 0.5, 0), ("onnxruntime-int8", 0.3, 0.01))
    runtimes = lambda ms, top1: {rt: {"latency_b1_ms": ms * f, "test_top1": top1 - d} for rt, f, d in scales}
    report = {"meta": {"study": "s", "deploy": {"cpu": "x"}},
              "models": {"teacher": {"deploy": runtimes(20, 0.9)}, "kd": {"deploy": runtimes(1, 0.8)}}}
    store_curve(tmp_path / "teacher", (2.0, 1.0), (0.5, 0.7))
    store_curve(tmp_path / "kd/seed0", (3.0, 2.0), (0.4, 0.6))
    store_curve(tmp_path / "kd/seed1", (1.0, 1.0), (0.2, 0.4))

    ax = plots.accuracy_vs_latency(report).axes[0]
    labels = [t.get_text() for t in ax.get_legend().get_texts()]
    assert labels == [f"{m} ({rt})" for m in ("teacher", "kd") for rt in ("pytorch", "onnxruntime", "onnxruntime-int8")]
    assert tuple(ax.containers[-1].lines[0].get_xydata()[0]) == pytest.approx((0.3, 79.0))
    assert not any(c.has_yerr for c in ax.containers)  # the deployment table's rows are single seeds
    seeds = {"meta": {"study": "s"}, "models": {"kd": {"latency_b1_ms": 1.0, "test_top1": 0.8, "test_top1_std": 0.01}}}
    bars = plots.accuracy_vs_latency(seeds).axes[0].containers[0]
    assert bars.has_yerr and bars.lines[2][0].get_segments()[0][:, 1] == pytest.approx([79.0, 81.0])

    loss_ax, acc_ax = plots.training_curves(tmp_path, ["teacher", "kd"]).axes
    assert [line.get_label() for line in acc_ax.get_lines()] == ["teacher", "kd (mean of 2 seeds)"]
    assert list(loss_ax.get_lines()[1].get_ydata()) == [2.0, 1.5] and list(acc_ax.get_lines()[1].get_ydata()) == \
        pytest.approx([30.0, 50.0])

    paths = plots.write_plots(tmp_path, report)
    for path, size in zip(paths, ((840, 540), (1200, 480))):
        image = Image.open(path)
        assert image.format == "PNG" and image.size == size


def test_a_metrics_csv_swapped_or_emptied_changes_no_curve(tmp_path):
    """metrics.csv is for reading: another model's copied over this one's, or one cut to its header, draws nothing
    different."""
    store_curve(tmp_path / "baseline", (2.0, 1.0), (0.5, 0.7))
    store_curve(tmp_path / "kd", (3.0, 2.0), (0.4, 0.6))
    before = plots.curves(tmp_path, ["baseline", "kd"])
    (tmp_path / "baseline/metrics.csv").write_text("epoch,train_loss,val_top1\n1,9.0,0.99\n2,8.0,0.98\n")
    (tmp_path / "kd/metrics.csv").write_text("epoch,train_loss,val_top1\n")
    assert plots.curves(tmp_path, ["baseline", "kd"]) == before == {
        "baseline": [(1, 2.0, 50.0), (2, 1.0, 70.0)], "kd": [(1, 3.0, 40.0), (2, 2.0, 60.0)]}


def test_a_result_without_a_curve_is_named_not_dropped_silently(tmp_path, capsys):
    (tmp_path / "teacher").mkdir()
    kd.store.write_json(tmp_path / "teacher/result.json", {"training": {}})
    assert plots.curves(tmp_path, ["teacher"]) == {}
    assert "[plots] teacher: no training curve recorded in its result.json" in capsys.readouterr().out


def test_a_tampered_result_is_refused_by_the_pictures_too(tmp_path):
    store_curve(tmp_path / "kd", (3.0, 2.0), (0.4, 0.6))
    path = tmp_path / "kd/result.json"
    path.write_text(path.read_text().replace("0.4", "0.9"))
    with pytest.raises(kd.store.KDError, match="its content does not match its digest"):
        plots.curves(tmp_path, ["kd"])
