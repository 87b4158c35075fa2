"""A study: obtain the teacher, train (or reuse) every student stage for every seed, measure every model, report.

Three parts, each with one job, share a Setting (kd/study/setting.py): the Teacher (kd/study/teacher.py), the
Students (kd/study/students.py) and the measurements and report (kd/study/results.py)."""
import yaml

from kd.config import to_dict
from kd.log import describe_time, info
from kd.store import writable_folder, write_text
from kd.study import results
from kd.study.setting import Setting
from kd.study.students import Students
from kd.study.teacher import Teacher


class Study:
    def __init__(self, cfg, resume=False, profile=False):
        self.setting = Setting(cfg, resume, profile)
        self.teacher = Teacher(self.setting)
        self.students = Students(self.setting, self.teacher)

    def check(self):
        """Before any long work: the folders this run writes in are writable, the teacher checkpoint there is intact
        and made for this study, every model and method of the study runs one real training step on the training
        device, and with deploy.onnx the untrained teacher and student export to ONNX (and int8)."""
        s = self.setting
        writable_folder(s.folder.root, "output_dir", inside=["teacher", *self.students.folder_names()])
        deploy = results.deploy_module() if s.cfg.deploy.onnx else None
        self.teacher.check()
        self.students.check()
        info(f"[check] one training step on {s.device} passed for "
             f"{'' if self.teacher.stored else 'the teacher and '}"
             f"{len(s.cfg.stages)} stage(s) x {len(s.cfg.student_seeds)} seed(s)")
        if deploy:
            deploy.check({"teacher": (s.new_model(s.cfg.teacher, "teacher"), self.teacher.card(None)),
                          "student": (s.new_model(s.cfg.student, "student"), self.students.card("student", None))},
                         s.cfg.deploy.int8)
            info(f"[check] the teacher and the student export to ONNX{' and int8' if s.cfg.deploy.int8 else ''}")

    def run(self):
        s = self.setting
        with s.clock.phase("check"):
            self.check()
        if s.main:
            write_text(s.folder.root / "config.yaml", yaml.safe_dump(to_dict(s.cfg), sort_keys=False))
        with s.clock.phase("teacher"):
            teacher = self.teacher.obtain()
        rows = results.summaries(teacher, self.students.run(), s.cfg.student_seeds)
        if not s.main:
            return None
        with s.clock.phase("profiles"):
            results.measure(s, self.teacher, self.students, rows)
            deployed = results.deploy_module().facts(s.cfg.deploy, len(s.data.train)) if s.cfg.deploy.onnx else None
        with s.clock.phase("report"):
            report = results.report(s, self.teacher, rows, deployed)
        info(f"[time] {describe_time(s.clock.phases, s.clock.parts)} (total {sum(s.clock.phases.values()):.1f} s)")
        return report
