"""A model's card: what a deployed model needs to know about itself (architecture, input, normalisation, class
names, and what made it), stored in its checkpoint and in its ONNX files, so one file rebuilds, feeds and labels
the model without the study's config."""
import math
import warnings

import torch
from PIL import Image, UnidentifiedImageError

from kd.config import MAX_IMAGE_SIZE
from kd.data.datasets import eval_transform
from kd.errors import KDError, first_line
from kd.store import differences, file_problem, load
from kd.train.models import create_model


def make(model_cfg, data, made_by):
    """`made_by`: the study, the model's name in it, the fingerprint of the data and recipe that made it, and the
    digest of the images it learnt from."""
    return {"model": {"name": model_cfg.name, "kwargs": dict(model_cfg.kwargs)},
            "input": {"channels": data.in_channels, "image_size": data.image_size, "resize": data.resize,
                      "mean": list(data.mean), "std": list(data.std)},
            "classes": list(data.classes), "made_by": made_by}


def problem(card):
    """What makes a card read from a file unusable by `build` and `read_image`, or None. Sizes are bounded as a
    config's are, so a forged card cannot make a prediction allocate without limit."""
    whole = lambda v, low, high: type(v) is int and low <= v <= high
    number = lambda v: type(v) in (int, float) and math.isfinite(v)
    if not isinstance(card, dict):
        return f"a {type(card).__name__}, not a mapping"
    m, i, classes = card.get("model"), card.get("input"), card.get("classes")
    if not (isinstance(m, dict) and isinstance(m.get("name"), str) and isinstance(m.get("kwargs"), dict)):
        return "model.name (a text) and model.kwargs (a mapping) are needed"
    if not isinstance(i, dict):
        return "input (a mapping) is needed"
    if i.get("channels") not in (1, 3) or type(i["channels"]) is not int:
        return f"input.channels is {i.get('channels')!r:.40}, not 1 or 3"
    if not whole(i.get("image_size"), 1, MAX_IMAGE_SIZE):
        return f"input.image_size is {i.get('image_size')!r:.40}, not a whole number from 1 to {MAX_IMAGE_SIZE}"
    if not whole(i.get("resize"), i["image_size"], 2 * i["image_size"]):
        return f"input.resize is {i.get('resize')!r:.40}, not a whole number from image_size to twice it"
    for key in ("mean", "std"):
        v = i.get(key)
        if not (isinstance(v, list) and len(v) == i["channels"] and all(map(number, v))) or \
                key == "std" and min(v) <= 0:
            return f"input.{key} is {v!r:.40}, not {i['channels']} number(s){' above 0' if key == 'std' else ''}"
    if not (isinstance(classes, list) and classes and all(isinstance(c, str) for c in classes)):
        return f"classes is {classes!r:.40}, not a list of class names"
    return None


def checked(card, path, remedy):
    """`card` as read from `path`, if usable; else one line naming the file."""
    if wrong := problem(card):
        raise KDError(f"{path}: its card is not valid ({wrong}); {remedy}")
    return card


def mismatch(recorded, expected):
    """What differs between two cards in what the model expects (input and classes), as 'key: a -> b' phrases;
    `recorded`, read from a file, may not be a valid card."""
    if wrong := problem(recorded):
        return [f"card: {wrong}"]
    pick = lambda card: {k: card[k] for k in ("input", "classes")}
    return differences(pick(recorded), pick(expected))


def build(card):
    """The untrained model the card describes."""
    m, i = card["model"], card["input"]
    return create_model(m["name"], "card.model", m["kwargs"], i["channels"], len(card["classes"]), i["image_size"])


def check_outputs(path, card, outputs):
    """One line if a model giving `outputs` scores per image does not fit its card's classes."""
    if outputs != len(card["classes"]):
        raise KDError(f"{path}: its card lists {len(card['classes'])} classes but its model gives {outputs} "
                      "scores per image, so its predictions cannot be named")


def load_checkpoint(path):
    """(model with its weights, card) from a checkpoint this toolkit wrote: a stage's best.pt or a teacher. Its
    card is checked, and the model run once on a blank image of the card's input to check its outputs."""
    remedy = "point to a best.pt or teacher checkpoint written by this toolkit"
    ckpt = load(path, remedy, unsigned_ok=True)  # a folder, a FIFO or a link to nothing is named as what it is
    if "card" not in ckpt or "model" not in ckpt:
        raise KDError(f"{path}: carries no card (written by another tool or before cards existed), so its "
                      "architecture and input are unknown; run its study again, which adds the card to a finished "
                      "stage's best.pt, or use the model.onnx that deploy.onnx exports")
    card = checked(ckpt["card"], path, remedy)
    try:
        model = build(card)
    except KDError as e:
        raise KDError(f"{path}: its card describes no model this toolkit can build ({e}); {remedy}") from None
    try:
        model.load_state_dict(ckpt["model"])
    except (RuntimeError, TypeError) as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]  # torch's first line only says it failed
        raise KDError(f"{path}: its weights do not fit the model its card describes "
                      f"({(lines[1:] or lines)[0].strip()[:160]}); {remedy}") from None
    i = card["input"]
    try:
        with torch.inference_mode():
            outputs = model.eval()(torch.zeros(1, i["channels"], i["image_size"], i["image_size"])).shape[-1]
    except Exception as e:  # the model's own code, run on the input its card describes
        raise KDError(f"{path}: its model fails on the input its card describes ({first_line(e)}); {remedy}") \
            from None
    check_outputs(path, card, outputs)
    return model, card


def read_image(path, card):
    """One image file as the model sees it: (C, H, W) float tensor, converted, resized, cropped, normalised.
    Images with more pixels than Pillow's decompression-bomb limit are refused before they are decoded."""
    i = card["input"]
    if (reason := file_problem(path)) is not None:
        raise KDError(f"{path}: {reason}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                image = image.convert("L" if i["channels"] == 1 else "RGB")
    except UnidentifiedImageError:
        raise KDError(f"{path}: not an image file") from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        raise KDError(f"{path}: too large to decode safely ({first_line(e)}); shrink it first") from None
    except Exception as e:  # a damaged or crafted file fails in many ways inside Pillow's decoders
        raise KDError(f"{path}: unreadable ({first_line(e)})") from None
    return eval_transform(i["image_size"], i["resize"], i["mean"], i["std"])(image)
