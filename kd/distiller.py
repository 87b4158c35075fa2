"""The Distiller: a student, an optional frozen teacher, and the distillation methods that tie them together."""
import torch
import torch.nn.functional as F
from torch import nn

from .losses import FEATURE_LOSSES, LOGIT_LOSSES
from .registry import ConfigError


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


def layer_names(model, depth=2):
    """The hookable module names, shallow ones only so an error message stays one readable line."""
    return ", ".join(n for n, _ in model.named_modules() if n and n.count(".") < depth)


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
        keys = [f"features[{j}]" for j in range(len(self.pairs))]
        self.student_hooks = FeatureHooks(student, [s for s, _, _ in self.pairs], keys)
        self.teacher_hooks = FeatureHooks(teacher, [t for _, t, _ in self.pairs], keys) if teacher else None

    @classmethod
    def build(cls, stage, student, teacher, sample, label_smoothing, key):
        """Create the stage's methods; feature connectors are sized by one dry forward pass on `sample`."""
        logit = None
        if stage.logit is not None:
            logit = LOGIT_LOSSES.build(stage.logit.name, f"{key}.logit", dict(stage.logit.params))
        features = []
        if stage.features:
            keys = [f"{key}.features[{j}]" for j in range(len(stage.features))]
            s_hooks = FeatureHooks(student, [f.student for f in stage.features], [f"{k}.student" for k in keys])
            t_hooks = FeatureHooks(teacher, [f.teacher for f in stage.features], [f"{k}.teacher" for k in keys])
            was_training = student.training
            with torch.no_grad(), s_hooks as s_out, t_hooks as t_out:
                student.eval()(sample), teacher.eval()(sample)
            student.train(was_training)
            for f, k in zip(stage.features, keys):
                method = FEATURE_LOSSES.build(f.name, k, dict(f.params), student_shape=tuple(s_out[f.student].shape[1:]),
                                              teacher_shape=tuple(t_out[f.teacher].shape[1:]))
                features.append((method, f.student, f.teacher, f.weight))
        return cls(student, teacher if stage.uses_teacher else None, logit, features, label_smoothing)

    def train(self, mode=True):
        super().train(mode)
        if self.teacher is not None:
            self.teacher.eval()
        return self

    def learnable(self):
        """What the optimizer trains and a checkpoint saves: the student plus the methods' own modules."""
        return nn.ModuleDict({"student": self.student, "logit": self.logit or nn.Identity(), "features": self.features})

    def forward(self, x, y, teacher_out=None):
        """`teacher_out` ({"logits", "features"} from the teacher cache) replaces the teacher's forward pass."""
        with self.student_hooks as s_out:
            logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        terms = {"ce": ce}
        loss = ce
        if self.teacher is not None:
            if teacher_out is None:
                with torch.no_grad(), self.teacher_hooks as t_out:
                    teacher_out = {"logits": self.teacher(x), "features": t_out}
            if self.logit is not None:
                terms["logit"] = self.logit(logits, teacher_out["logits"])
                loss = self.logit.ce_weight * ce + terms["logit"]
            for j, (method, (s, t, w)) in enumerate(zip(self.features, self.pairs)):
                terms[f"feat{j}"] = method(s_out[s], teacher_out["features"][t])
                loss = loss + w * terms[f"feat{j}"]
        terms["loss"] = loss
        return logits, terms
