"""Nothing damaged is ever used, and the file system never ends in a traceback: every file the run reads back
carries a digest checked when read, identities are digests of content, and file-system problems are one line,
found before the long work where they can be."""
import contextlib
import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import kd.device
import kd.errors
import kd.store
import run

ROOT = Path(__file__).resolve().parents[1]


def flip(path):
    """64 bytes inverted in the middle: the file keeps its size and, most often, its format."""
    b = bytearray(path.read_bytes())
    mid = len(b) // 2
    b[mid:mid + 64] = bytes(x ^ 0xFF for x in b[mid:mid + 64])
    path.write_bytes(bytes(b))


def truncate(path):
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def garble(path):
    path.write_bytes(np.random.default_rng(0).bytes(path.stat().st_size))


def plant(path, payload):
    """The checkpoint's keys kept, each value an object whose unpickling runs code (creates `ran-code` beside it);
    the digest recomputed by hand, as an attacker would."""
    ckpt = kd.store.load(path, "")
    planted = {k: payload(path.parent / "ran-code") for k in ckpt}
    torch.save({**planted, "digest": kd.store.content_digest(planted)}, path)


DAMAGE = {"flipped": flip, "truncated": truncate, "garbled": garble}


def smoke(**changes):
    """configs/smoke.yaml with paths relative to the current folder and `changes` merged into its sections."""
    raw = yaml.safe_load((ROOT / "configs" / "smoke.yaml").read_text())
    raw.update(output_dir="runs", stages=[{"name": "baseline"}, {"name": "kd", "logit": {"name": "kd"}}])
    raw["teacher"]["checkpoint"] = "teacher.pt"
    for key, value in changes.items():
        raw[key] = {**raw[key], **value} if isinstance(value, dict) and isinstance(raw.get(key), dict) else value
    return raw


def write(raw, path="study.yaml"):
    Path(path).write_text(yaml.safe_dump(raw))
    return path


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished smoke study (teacher, baseline, kd) that each test copies and damages."""
    base = tmp_path_factory.mktemp("finished")
    with contextlib.chdir(base):
        assert run.main(["--config", write(smoke()), "--device", "cpu"]) == 0
    return base


@pytest.fixture
def study(finished, tmp_path, monkeypatch):
    """A copy of the finished study, as the current folder."""
    folder = tmp_path / "study"
    shutil.copytree(finished, folder)
    monkeypatch.chdir(folder)
    return folder


def state_of(folder):
    """Every file's bytes but the one damaged: nothing may be lost or rewritten when a run refuses."""
    return {p: p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


CHECKPOINTS = [  # (file, result.json to remove first so that the file is read on --resume)
    ("teacher.pt", None),
    ("runs/smoke/baseline/best.pt", None),
    ("runs/smoke/kd/best.pt", "runs/smoke/kd/result.json"),  # re-measured from best.pt when its result is lost
    ("runs/smoke/kd/last.pt", "runs/smoke/kd/result.json"),  # what --resume continues from
]


@pytest.mark.slow
@pytest.mark.parametrize("damage", [*DAMAGE, "planted"])
@pytest.mark.parametrize("file, unfinish", CHECKPOINTS, ids=[c[0].split("/", 2)[-1] for c in CHECKPOINTS])
def test_a_damaged_checkpoint_is_refused_in_one_line(study, file, unfinish, damage, payload, one_error_line):
    if unfinish:
        Path(unfinish).unlink()
    if damage == "planted":
        plant(Path(file), payload)
    else:
        DAMAGE[damage](Path(file))
    before = state_of(study)
    err = one_error_line.study("study.yaml", "--resume")
    # the run folder is the project's own; a teacher checkpoint may be anyone's file: never 'delete it'
    remedy = "point teacher.checkpoint at a new path" if file == "teacher.pt" else "delete runs/smoke/"
    # random bytes where a teacher checkpoint (anyone's file) should be are not taken for a damaged checkpoint
    says = f"{file}: not a PyTorch checkpoint" if (file, damage) == ("teacher.pt", "garbled") else f"{file} is damaged"
    assert says in err and remedy in err, err
    assert damage != "planted" or "could run code" in err, err
    assert state_of(study) == before and not list(study.rglob("ran-code"))  # nothing unpickled ran


@pytest.mark.slow
@pytest.mark.parametrize("edit", ["flipped", "truncated", "garbled", "number", "fields"])
@pytest.mark.parametrize("model", ["teacher", "baseline"])
def test_a_damaged_result_is_refused_in_one_line(study, model, edit, one_error_line):
    path = Path(f"runs/smoke/{model}/result.json")
    if edit in DAMAGE:
        DAMAGE[edit](path)
    else:  # valid JSON, but not what the run wrote
        result = json.loads(path.read_text())
        if edit == "number":
            result["test_top1"] = 0.99
        else:
            fields = {"fingerprint": result["fingerprint"]}
            result = {**fields, "digest": kd.store.fingerprint(fields)}
        path.write_text(json.dumps(result))
    before = state_of(study)
    err = one_error_line.study("study.yaml")
    assert f"{path} is damaged" in err and f"delete runs/smoke/{model}" in err, err
    assert state_of(study) == before


@pytest.mark.slow
def test_a_best_pt_swapped_for_another_models_is_refused(study, one_error_line):
    shutil.copy("runs/smoke/kd/best.pt", "runs/smoke/baseline/best.pt")
    err = one_error_line.study("study.yaml")
    assert "runs/smoke/baseline/best.pt is not the one its result.json describes" in err


@pytest.mark.slow
def test_a_moved_run_folder_is_reused_whole(study, capsys):
    shutil.move("runs", "moved")
    capsys.readouterr()
    assert run.main(["--config", "study.yaml", "--device", "cpu", "--set", "output_dir=moved"]) == 0
    out = capsys.readouterr().out
    assert "[baseline] finished earlier" in out and "[kd] finished earlier" in out and "epoch 1/" not in out
    report = json.loads(Path("moved/smoke/report.json").read_text())["models"]
    assert report["kd"]["checkpoint"] == "kd/best.pt"


@pytest.mark.slow
def test_an_identically_retrained_teacher_keeps_every_result(study, capsys):
    """The teacher is identified by its weights, not by its file's bytes (which hold its training timings)."""
    ckpt = kd.store.load("teacher.pt", "")
    ckpt["train"] = {**ckpt["train"], "epoch_seconds": 1e9}
    kd.store.save(ckpt, "teacher.pt")
    capsys.readouterr()
    assert run.main(["--config", "study.yaml", "--device", "cpu"]) == 0
    assert "[kd] finished earlier" in capsys.readouterr().out


# --- the file system -------------------------------------------------------------------------------------------------

def blocker(path):
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text("a file where a folder should be")


FOLDERS = {  # a config key, the change that points it at a file, the file
    "output_dir": ({}, "runs"),
    "output_dir ": ({}, "runs/smoke/kd"),  # a model's folder inside the run folder
    "teacher.checkpoint": ({"teacher": {"checkpoint": "taken/teacher.pt"}}, "taken"),
    "data.root": ({"data": {"root": "data"}}, "data"),
}


@pytest.mark.parametrize("key", FOLDERS)
def test_a_file_where_a_folder_should_be_stops_the_run_before_any_training(key, tmp_path, monkeypatch,
                                                                           one_error_line):
    monkeypatch.chdir(tmp_path)
    changes, file = FOLDERS[key]
    blocker(file)
    err = one_error_line.study(write(smoke(**changes)))
    assert f"{key.strip()}: {file}" in err, err
    assert not Path("teacher.pt").exists() and not Path("taken/teacher.pt").exists()


def test_a_model_folder_that_cannot_be_written_stops_the_run_before_any_training(tmp_path, monkeypatch,
                                                                                 one_error_line):
    """A stage's folder left read-only (a copied run, another user's) would fail only when that stage saves."""
    monkeypatch.chdir(tmp_path)
    Path("runs/smoke/kd").mkdir(parents=True)
    temporary_file = tempfile.TemporaryFile

    def refuse_in_kd(dir=None, **kwargs):  # as chmod a-w would, also for root, whom chmod does not stop
        if Path(dir).name == "kd":
            raise PermissionError(13, "Permission denied")
        return temporary_file(dir=dir, **kwargs)
    monkeypatch.setattr(kd.store.tempfile, "TemporaryFile", refuse_in_kd)
    err = one_error_line.study(write(smoke()))
    assert "output_dir: runs/smoke/kd is not writable (" in err and "Permission denied" in err, err
    assert not Path("teacher.pt").exists()


def test_a_teacher_checkpoint_that_is_someone_elses_file_is_named_for_what_it_is(tmp_path, monkeypatch,
                                                                                  one_error_line):
    """`teacher.checkpoint: README.md` is not a damaged checkpoint, and is not the project's to tell anyone to
    delete."""
    monkeypatch.chdir(tmp_path)
    Path("README.md").write_text("# my project\n")
    err = one_error_line.study(write(smoke(teacher={"checkpoint": "README.md"})))
    assert "README.md: not a PyTorch checkpoint (a file of another kind); point teacher.checkpoint at a new path" \
        in err, err
    assert "damaged" not in err and "delete" not in err
    assert Path("README.md").read_text() == "# my project\n"


def test_a_teacher_checkpoint_that_is_a_folder_is_refused(tmp_path, monkeypatch, one_error_line):
    monkeypatch.chdir(tmp_path)
    Path("teacher.pt").mkdir()
    assert "teacher.checkpoint: teacher.pt is not a file" in one_error_line.study(write(smoke()))


@pytest.mark.slow
@pytest.mark.parametrize("target", ["last.pt", "teacher.pt", "result.json"])
def test_a_full_disk_mid_save_is_one_line_and_leaves_no_temporary_file(target, tmp_path, monkeypatch, capsys,
                                                                        one_error_line):
    """The first write of each kind fails: the teacher's epoch state, its checkpoint once trained, its result once
    measured. One line names the file; once the teacher is trained, --resume finishes without training it again."""
    monkeypatch.chdir(tmp_path)
    write_bytes, write_text = Path.write_bytes, Path.write_text

    def full(write):
        def refuse(self, data, *args, **kwargs):
            if self.name == f"{target}.tmp":
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            return write(self, data, *args, **kwargs)
        return refuse
    monkeypatch.setattr(Path, "write_bytes", full(write_bytes))
    monkeypatch.setattr(Path, "write_text", full(write_text))
    err = one_error_line.study(write(smoke(stages=[{"name": "baseline"}])))
    assert f"{target}: cannot write it (No space left on device)" in err, err
    assert not list(tmp_path.rglob("*.tmp"))
    monkeypatch.setattr(Path, "write_bytes", write_bytes)
    monkeypatch.setattr(Path, "write_text", write_text)
    assert run.main(["--config", "study.yaml", "--device", "cpu", "--resume"]) == 0
    assert ("[teacher] epoch 1/1" in capsys.readouterr().out) == (target == "last.pt")


# --- the teacher cache -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("array, damage", [("logits", "flipped"), ("logits", "zeroed"), ("feature.stages.1", "garbled"),
                                           ("logits", "header")])
def test_a_damaged_cache_array_is_rebuilt_to_the_same_bytes(make_study, array, damage, capsys):
    folder = make_study().students.cache().folder
    path = folder / f"{array}.npy"
    pristine = path.read_bytes()
    b = bytearray(pristine)
    if damage == "flipped":
        b[len(b) // 2] ^= 0xFF
        b[len(b) // 2 + 1] ^= 0xFF
    elif damage == "zeroed":
        n = min(4096, len(b) - 128)  # past the header
        b[-n:] = bytes(n)
    elif damage == "header":
        b[:16] = b"garbage-garbage!"
    else:
        b = bytearray(np.random.default_rng(0).bytes(len(b)))
    path.write_bytes(bytes(b))
    capsys.readouterr()
    assert make_study().students.cache().folder == folder
    assert f"{path} does not match its digest (damaged); rebuilding" in capsys.readouterr().out
    assert path.read_bytes() == pristine


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_cache_manifest_is_rebuilt(make_study, damage, capsys):
    folder = make_study().students.cache().folder
    DAMAGE[damage](folder / "manifest.json")
    capsys.readouterr()
    make_study().students.cache().folder
    out = capsys.readouterr().out
    assert ("is damaged; rebuilding" in out or "incomplete" in out) and "[cache] building" in out
    assert json.loads((folder / "manifest.json").read_text())["arrays"]


def test_a_cache_that_would_not_fit_stops_the_run_before_the_teacher_trains(make_config, tmp_path, monkeypatch,
                                                                            one_error_line):
    usage = shutil.disk_usage("/")
    monkeypatch.setattr(kd.store.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(make_config()))
    err = one_error_line.study(path)
    assert "cache.dir: the teacher cache needs" in err
    assert not (tmp_path / "teacher.pt").exists() and not (tmp_path / "cache").exists()


def test_a_cache_dir_that_is_a_file_stops_the_run_before_the_teacher_trains(make_config, tmp_path, one_error_line):
    (tmp_path / "cache").write_text("")
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(make_config()))
    assert f"cache.dir: {tmp_path / 'cache'} cannot be a folder" in one_error_line.study(path)
    assert not (tmp_path / "teacher.pt").exists()


def test_another_studys_cache_copied_in_is_never_replayed(make_study, tmp_path, capsys):
    """The arrays and manifest of a cache made from another teacher, copied over this study's: each verifies against
    its own manifest, but the manifest records the teacher and data it was made from, so it is rebuilt."""
    folder = make_study().students.cache().folder
    pristine = (folder / "logits.npy").read_bytes()
    other = make_study(cache={"dir": str(tmp_path / "other")}, teacher={"checkpoint": str(tmp_path / "other.pt")},
                       seed=1).students.cache().folder
    assert (other / "logits.npy").read_bytes() != pristine
    for file in other.iterdir():
        shutil.copy(file, folder / file.name)
    capsys.readouterr()
    make_study().students.cache()
    out = capsys.readouterr().out
    assert f"[cache] {folder} holds outputs made from something else (identity.seed: 1 -> 0" in out, out
    assert (folder / "logits.npy").read_bytes() == pristine


def test_an_identically_retrained_teacher_reuses_the_cache(make_study, tmp_path, capsys):
    folder = make_study().students.cache().folder
    ckpt = kd.store.load(tmp_path / "teacher.pt", "")
    kd.store.save({**ckpt, "train": {**ckpt["train"], "epoch_seconds": 1e9}}, tmp_path / "teacher.pt")
    capsys.readouterr()
    assert make_study().students.cache().folder == folder
    assert "[cache] reusing" in capsys.readouterr().out


# --- kill -9 ---------------------------------------------------------------------------------------------------------

@pytest.mark.slow
def test_kill_9_mid_training_resumes_to_the_uninterrupted_result(tmp_path, assert_same_training):
    """A real SIGKILL (no handler runs) in the middle of a stage; --resume then ends bit-identical to a run that was
    never interrupted."""
    def config(name):
        raw = smoke(name=name, data={"train_subset": 512}, train={"epochs": 3, "checkpoint_seconds": 0},
                    stages=[{"name": "baseline"}],
                    teacher={"name": "cnn", "kwargs": {"channels": [8, 16, 32], "blocks": 1}})
        return write(raw, tmp_path / f"{name}.yaml")

    def cli(name, *args):
        return [sys.executable, str(ROOT / "run.py"), "--config", str(config(name)), "--device", "cpu", *args]
    done = subprocess.run(cli("full"), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr
    last = tmp_path / "runs" / "killed" / "baseline" / "last.pt"
    proc = subprocess.Popen(cli("killed"), cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    while not last.exists() and proc.poll() is None:
        time.sleep(0.005)
    time.sleep(0.1)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL
    assert not (last.parent / "result.json").exists()  # killed mid-stage, not after it
    resumed = subprocess.run(cli("killed", "--resume"), capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_training(tmp_path / "runs" / "full" / "baseline", last.parent)


def test_a_foreign_error_in_a_one_line_message_loses_its_escape_codes_and_is_cut_at_a_word():
    line = kd.errors.first_line(RuntimeError("\x1b[1mWeights only\x1b[0m load failed " + "because " * 30 + "\nmore"))
    assert line.startswith("Weights only load failed because") and line.endswith("because ...") and len(line) <= 164
    assert "\x1b" not in line and "more" not in line


def test_differences_name_a_key_that_one_identity_lacks():
    """A field added to the config (unset in an identity recorded before it existed) is named, not hidden."""
    assert kd.store.differences({"a": 1}, {"a": 1, "b": None}) == ["b: '(unset)' -> None"]


def test_a_stage_trained_in_fp32_is_not_reused_where_auto_means_bf16(smoke_config, monkeypatch, capsys,
                                                                        one_error_line):
    """`amp: auto` is fp32 on a CPU without native bf16 and bf16 on one with it: a stage's identity records the
    precision that trained it, so its result is never reported as the other's."""
    path = smoke_config(stages=[{"name": "baseline"}], eval={"repeats": 1, "warmup": 0})
    monkeypatch.setattr(kd.device, "native_bf16", lambda device: False)
    assert run.main(["--config", str(path), "--device", "cpu"]) == 0
    capsys.readouterr()
    monkeypatch.setattr(kd.device, "native_bf16", lambda device: True)
    line = one_error_line.study(path)
    assert "baseline: finished under a different config (train.amp: 'fp32' -> 'bf16')" in line, line
