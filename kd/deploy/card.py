"""A model's card: what a deployed model needs to know about itself (architecture, input, normalisation, class
names, and what made it), stored in its checkpoint and in its ONNX files, so one file rebuilds, feeds and labels
the model without the study's config."""
from PIL import Image, UnidentifiedImageError

from kd.data.datasets import eval_transform
from kd.errors import KDError
from kd.store import differences, load
from kd.train.models import create_model


def make(model_cfg, data, made_by):
    """`made_by`: the study, the model's name in it, the fingerprint of the data and recipe that made it, and the
    digest of the images it learnt from."""
    return {"model": {"name": model_cfg.name, "kwargs": dict(model_cfg.kwargs)},
            "input": {"channels": data.in_channels, "image_size": data.image_size, "resize": data.resize,
                      "mean": list(data.mean), "std": list(data.std)},
            "classes": list(data.classes), "made_by": made_by}


def mismatch(recorded, expected):
    """What differs between two cards in what the model expects (input and classes), as 'key: a -> b' phrases."""
    pick = lambda card: {k: card[k] for k in ("input", "classes")}
    return differences(pick(recorded), pick(expected))


def build(card):
    """The untrained model the card describes."""
    m, i = card["model"], card["input"]
    return create_model(m["name"], "card.model", m["kwargs"], i["channels"], len(card["classes"]), i["image_size"])


def load_checkpoint(path):
    """(model with its weights, card) from a checkpoint this toolkit wrote: a stage's best.pt or a teacher."""
    remedy = "point to a best.pt or teacher checkpoint written by this toolkit"
    ckpt = load(path, remedy, unsigned_ok=True)
    if "card" not in ckpt or "model" not in ckpt:
        raise KDError(f"{path}: carries no card (written by another tool or before cards existed), so its "
                      "architecture and input are unknown; run its study again, which adds the card to a finished "
                      "stage's best.pt, or use the model.onnx that deploy.onnx exports")
    model = build(ckpt["card"])
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:
        raise KDError(f"{path}: its weights do not fit the model its card describes "
                      f"({(str(e).strip().splitlines() or [type(e).__name__])[0][:160]})") from None
    return model.eval(), ckpt["card"]


def read_image(path, card):
    """One image file as the model sees it: (C, H, W) float tensor, converted, resized, cropped, normalised."""
    i = card["input"]
    try:
        with Image.open(path) as image:
            image = image.convert("L" if i["channels"] == 1 else "RGB")
    except (OSError, UnidentifiedImageError, ValueError) as e:
        reason = "not found" if isinstance(e, FileNotFoundError) else \
            "not an image file" if isinstance(e, UnidentifiedImageError) else f"unreadable ({e})"
        raise KDError(f"{path}: {reason}") from None
    return eval_transform(i["image_size"], i["resize"], i["mean"], i["std"])(image)
