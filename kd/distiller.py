"""The Distiller: a student, an optional frozen teacher, and the distillation methods that tie them together."""
import torch
import torch.nn.functional as F
from torch import nn

from .losses import FEATURE_LOSSES, LOGIT_LOSSES
from .registry import ConfigError


class FeatureHooks:
    """Keeps the outputs of named modules from the last forward pass; the models themselves stay untouched."""

    def __init__(self, model, names, key):
        modules = dict(model.named_modules())
        self.outputs, self.handles = {}, []
        for name, k in zip(names, key):
            if name not in modules:
                raise ConfigError(k, f"no layer '{name}' in this model; layers: {layer_names(model)}")
            self.handles.append(modules[name].register_forward_hook(self._keep(name)))

    def _keep(self, name):
        def hook(module, inputs, output):
            self.outputs[name] = output
        return hook

    def pop(self):
        outputs, self.outputs = self.outputs, {}
        return outputs


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
        self.student_hooks = self.teacher_hooks = None
        if self.pairs:
            self.student_hooks = FeatureHooks(student, [s for s, _, _ in self.pairs], [""] * len(self.pairs))
            self.teacher_hooks = FeatureHooks(teacher, [t for _, t, _ in self.pairs], [""] * len(self.pairs))

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
            with torch.no_grad():
                student.eval()(sample), teacher.eval()(sample)
            student.train(was_training)
            s_out, t_out = s_hooks.pop(), t_hooks.pop()
            for h in s_hooks.handles + t_hooks.handles:
                h.remove()
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

    def forward(self, x, y):
        logits = self.student(x)
        ce = F.cross_entropy(logits.float(), y, label_smoothing=self.label_smoothing)
        terms = {"ce": ce}
        loss = ce
        if self.teacher is not None:
            with torch.no_grad():
                t_logits = self.teacher(x)
            if self.logit is not None:
                terms["logit"] = self.logit(logits, t_logits)
                loss = self.logit.ce_weight * ce + terms["logit"]
            if self.pairs:
                s_out, t_out = self.student_hooks.pop(), self.teacher_hooks.pop()
                for j, (method, (s, t, w)) in enumerate(zip(self.features, self.pairs)):
                    terms[f"feat{j}"] = method(s_out[s], t_out[t])
                    loss = loss + w * terms[f"feat{j}"]
        terms["loss"] = loss
        return logits, terms
