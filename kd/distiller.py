"""The Distiller: a student, an optional frozen teacher, and the distillation methods that tie them together."""
import torch
import torch.nn.functional as F
from torch import nn

from .losses import FEATURE_LOSSES, LOGIT_LOSSES, Probe, Step
from .registry import ConfigError, blame


class FeatureHooks:
    """While active (a `with` block), records the outputs of named modules with forward hooks.

    Hooks exist only inside the block, so the same teacher or student used elsewhere (its own training,
    evaluation, latency measurement) runs unhooked, and no activation outlives the step that made it.
    """

    def __init__(self, model, names, keys):
        modules = dict(model.named_modules())
        for name, key in zip(names, keys):
            if name not in modules:
                raise ConfigError(key, f"no layer '{name}' in this model; layers: {layer_names(model)}")
        self.modules = {name: modules[name] for name in names}
        self.outputs, self.handles = {}, []

    def _keep(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def __enter__(self):
        self.outputs = {}
        self.handles = [m.register_forward_hook(self._keep(n)) for n, m in self.modules.items()]
        return self.outputs

    def __exit__(self, *exc):
        for handle in self.handles:
            handle.remove()
        self.handles = []


def device_of(model):
    return next(iter(model.parameters()), torch.empty(0)).device


def layer_names(model, depth=2):
    """The hookable module names, shallow ones only so an error message stays one readable line."""
    return ", ".join(n for n, _ in model.named_modules() if n and n.count(".") < depth)


def layer_keys(features, side, key):
    """Each hooked layer name once, with the config key that first names it (for error messages)."""
    keys = {}
    for j, f in enumerate(features):
        for name in getattr(f, side):
            keys.setdefault(name, f"{key}.features[{j}].{side}")
    return list(keys), list(keys.values())


class Distiller(nn.Module):
    """Trains `student`; the teacher stays in eval mode, runs without autograd and is not in `learnable()`.

    The loss is ce_weight * CE + the logit method's term + sum of weight * feature term. With no methods it is
    plain cross-entropy, which is how the baseline student and the teacher itself are trained.
    """

    def __init__(self, student, teacher=None, logit=None, features=(), label_smoothing=0.0):
        super().__init__()
        self.student, self.teacher = student, teacher
        self.logit = logit
        self.features = nn.ModuleList(method for method, *_ in features)
        self.pairs = [(s, t, w) for _, s, t, w in features]
        self.label_smoothing = label_smoothing
        s_names = list(dict.fromkeys(n for s, _, _ in self.pairs for n in s))
        t_names = list(dict.fromkeys(n for _, t, _ in self.pairs for n in t))
        self.student_hooks = FeatureHooks(student, s_names, s_names)
        self.teacher_hooks = FeatureHooks(teacher, t_names, t_names) if teacher else None

    @classmethod
    def build(cls, stage, student, teacher, sample, label_smoothing, key, num_samples=0):
        """Create the stage's methods; their modules are sized by one dry forward pass of `sample`, run on the
        device each model lives on, and live on the student's."""
        logit = None
        if stage.logit is not None:
            logit = LOGIT_LOSSES.build(stage.logit.name, f"{key}.logit", dict(stage.logit.params))
            weight = getattr(logit, "ce_weight", None)
            if not isinstance(logit, nn.Module) or not isinstance(weight, (int, float)) or isinstance(weight, bool):
                raise ConfigError(f"{key}.logit", f"logit method '{stage.logit.name}' must be an nn.Module with a "
                                  f"numeric ce_weight attribute (see kd/losses/base.py), got ce_weight={weight!r}")
        features = []
        if stage.features:
            for j, f in enumerate(stage.features):
                want = getattr(FEATURE_LOSSES.get(f.name, f"{key}.features[{j}]"), "layers", 1)
                if len(f.student) != len(f.teacher) or want is not None and len(f.student) != want:
                    raise ConfigError(f"{key}.features[{j}]", f"'{f.name}' matches {want or 'the same number of'} "
                                      f"student and teacher layer(s); got {len(f.student)} and {len(f.teacher)}")
            s_hooks = FeatureHooks(student, *layer_keys(stage.features, "student", key))
            t_hooks = FeatureHooks(teacher, *layer_keys(stage.features, "teacher", key))
            was_training = student.training
            with torch.no_grad(), s_hooks as s_out, t_hooks as t_out, \
                    blame([(student, "student"), (teacher, "teacher")], key, "the dry forward pass failed"):
                logits = student.eval()(sample.to(device_of(student)))
                teacher.eval()(sample.to(device_of(teacher)))
            student.train(was_training)
            for j, f in enumerate(stage.features):
                probe = Probe([tuple(s_out[n].shape[1:]) for n in f.student],
                              [tuple(t_out[n].shape[1:]) for n in f.teacher], num_samples, logits.shape[1])
                method = FEATURE_LOSSES.build(f.name, f"{key}.features[{j}]", dict(f.params), probe=probe)
                if not isinstance(method, nn.Module):
                    raise ConfigError(f"{key}.features[{j}]", f"feature method '{f.name}' must be an nn.Module")
                features.append((method.to(device_of(student)), f.student, f.teacher, f.weight))
        return cls(student, teacher if stage.uses_teacher else None, logit, features, label_smoothing)

    def parts(self, key, student_key="student"):
        """(module, loss term, config key) of each part whose code may fail, so an error names the key to fix."""
        parts = [(self.student, None, student_key)] + ([(self.teacher, None, "teacher")] if self.teacher else [])
        if self.logit is not None:
            parts.append((self.logit, "logit", f"{key}.logit"))
        return parts + [(m, f"feat{j}", f"{key}.features[{j}]") for j, m in enumerate(self.features)]

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def learnable(self):
        """What the optimizer trains and a checkpoint saves: the student plus the methods' own modules."""
        return nn.ModuleDict({"student": self.student, "logit": self.logit or nn.Identity(), "features": self.features})

    def forward(self, x, y, teacher_out=None, index=None, epoch=0.0):
        """`teacher_out` ({"logits", "features"} from the teacher cache) replaces the teacher's forward pass;
        `index` (dataset indices) and `epoch` (fractional training progress) are passed on to the methods."""
        with self.student_hooks as s_out:
            logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        terms = {"ce": ce}
        loss = ce
        if self.teacher is not None:
            if teacher_out is None:
                with torch.no_grad(), self.teacher_hooks as t_out:
                    teacher_out = {"logits": self.teacher(x), "features": t_out}
            step = Step(y, index, epoch)
            if self.logit is not None:
                terms["logit"] = self.logit(logits, teacher_out["logits"], step)
                loss = self.logit.ce_weight * ce + terms["logit"]
            for j, (method, (s, t, w)) in enumerate(zip(self.features, self.pairs)):
                terms[f"feat{j}"] = method([s_out[n] for n in s], [teacher_out["features"][n] for n in t], step)
                loss = loss + w * terms[f"feat{j}"]
        terms["loss"] = loss
        return logits, terms
