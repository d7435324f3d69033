"""Accuracy on the built-in shapes data, scored by the shapes checker instead of FID.

Because every shapes scene has exact ground truth, a program can tell whether a generated
image shows the prompted objects and whether a generated caption names them:
- `scene_metrics`: text->image, object-level precision / recall and exact-scene accuracy,
  overall and split by the number of objects in the prompt;
- `prompt_accuracy`: text->image on single-object prompts, the rate of right colour, right
  shape, both (and every other flag the checker reports, e.g. position);
- `caption_accuracy`: image->text, the rate of captions that name the right colour and shape.

The checker functions are arguments (default: `cm3leon.data.checker`, imported when used), so
these metrics work with any detector whose objects have shape / color / size / cell fields."""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Callable, Sequence

from cm3leon.errors import CM3LeonError

# Attributes two objects must share to count as the same object: all four, as the checker's
# own `score_scene` matches; drop "size" where prompts do not state sizes.
DEFAULT_MATCH_ON = ("shape", "color", "size", "cell")


def _get(obj: Any, name: str) -> Any:
    """Field `name` of a dict or an object (lists become tuples, so cells compare equal)."""
    if isinstance(obj, dict):
        if name not in obj:
            raise CM3LeonError(f"object {obj!r} has no field {name!r}")
        v = obj[name]
    elif hasattr(obj, name):
        v = getattr(obj, name)
    else:
        raise CM3LeonError(f"object {obj!r} has no field {name!r}")
    return tuple(v) if isinstance(v, list) else v


def object_key(obj: Any, match_on: Sequence[str] = DEFAULT_MATCH_ON) -> tuple:
    """The attributes that identify an object for matching (default: shape, colour, size, cell)."""
    return tuple(_get(obj, f) for f in match_on)


def match_objects(detections: Sequence[Any], truth: Sequence[Any], match_on: Sequence[str] = DEFAULT_MATCH_ON) -> dict:
    """Count true positives as the multiset intersection of object keys: each true object is
    matched by at most one detection with the same attributes (for exact-key matching this
    equals the checker's greedy one-to-one matching).

    Returns {"tp", "fp", "fn", "exact"}; exact = the detected objects are exactly the true ones."""
    det = Counter(object_key(d, match_on) for d in detections)
    tru = Counter(object_key(t, match_on) for t in truth)
    tp = sum((det & tru).values())
    n_det, n_tru = sum(det.values()), sum(tru.values())
    return {"tp": tp, "fp": n_det - tp, "fn": n_tru - tp, "exact": det == tru}


def _prf(tp: int, fp: int, fn: int, exact: int, n: int) -> dict:
    return {
        "precision": tp / (tp + fp) if tp + fp else 0.0,
        "recall": tp / (tp + fn) if tp + fn else 0.0,
        "exact_scene": exact / n if n else 0.0,
        "n": n,
        "tp": tp,
        "fp": fp,
        "fn": fn,
    }


def scene_metrics(
    images: Sequence[Any],
    truths: Sequence[Sequence[Any]],
    detect: Callable[[Any], Sequence[Any]] | None = None,
    match_on: Sequence[str] = DEFAULT_MATCH_ON,
) -> dict:
    """Text->image accuracy: detect the objects in each generated image and match them to
    the prompt's true objects.

    Returns {"precision", "recall", "exact_scene", "n", "tp", "fp", "fn",
    "by_num_objects": {k: same fields for prompts with k objects}, "per_image": [...]}.
    Precision and recall are micro-averaged over objects; exact_scene is the fraction of
    images whose detected objects equal the prompt's exactly."""
    if len(images) != len(truths):
        raise CM3LeonError(f"{len(images)} images but {len(truths)} ground-truth object lists")
    if detect is None:
        from cm3leon.data.checker import detect_objects as detect
    per_image = []
    groups: dict[int, list[dict]] = defaultdict(list)
    for image, truth in zip(images, truths):
        m = match_objects(detect(image), truth, match_on)
        m["num_objects"] = len(truth)
        per_image.append(m)
        groups[len(truth)].append(m)

    def agg(ms: list[dict]) -> dict:
        return _prf(
            sum(m["tp"] for m in ms), sum(m["fp"] for m in ms), sum(m["fn"] for m in ms),
            sum(m["exact"] for m in ms), len(ms),
        )  # fmt: skip

    out = agg(per_image)
    out["by_num_objects"] = {k: agg(groups[k]) for k in sorted(groups)}
    out["per_image"] = per_image
    return out


def _field_means(results: Sequence[dict]) -> dict:
    """Mean of every scalar field (booleans as rates) over a list of checker results."""
    sums: dict[str, float] = defaultdict(float)
    counts: dict[str, int] = defaultdict(int)
    for r in results:
        for k, v in r.items():
            if isinstance(v, (bool, int, float)):
                sums[k] += float(v)
                counts[k] += 1
    return {k: sums[k] / counts[k] for k in sums}


def prompt_accuracy(
    images: Sequence[Any],
    prompts: Sequence[Any],
    check: Callable[[Any, Any], dict] | None = None,
) -> dict:
    """Text->image accuracy on single-object prompts: for each (generated image, prompt
    caption or true objects) the checker says whether colour and shape are right.

    Returns {"colour", "shape", "both", "n", "fields": {every scalar field of the checker's
    result (e.g. position_ok, all_ok): mean}}; "both" = colour and shape right in the same
    image. Meant for single-object prompts; with several objects the checker's flags mean
    "right for every requested object"."""
    if len(images) != len(prompts):
        raise CM3LeonError(f"{len(images)} images but {len(prompts)} prompts")
    if not images:
        raise CM3LeonError("no images to check")
    if check is None:
        from cm3leon.data.checker import check_prompt as check
    results = []
    for image, prompt in zip(images, prompts):
        r = dict(check(image, prompt))
        for k in ("colour_ok", "shape_ok"):
            if k not in r:
                raise CM3LeonError(f"checker result has no {k!r} field (got {sorted(r)})")
        r["both_ok"] = bool(r["colour_ok"]) and bool(r["shape_ok"])
        results.append(r)
    flags = _field_means(results)
    return {
        "colour": flags["colour_ok"],
        "shape": flags["shape_ok"],
        "both": flags["both_ok"],
        "n": len(results),
        "fields": flags,
    }


def caption_accuracy(
    captions: Sequence[str],
    truths: Sequence[Sequence[Any]],
    judge: Callable[[str, Any], dict] | None = None,
    correct_field: str = "all_ok",
) -> dict:
    """Image->text accuracy: the rate of generated captions the checker judges correct
    (naming the right colour and shape), plus the mean of every scalar field it reports
    (e.g. colour_ok, shape_ok, precision, recall).

    Returns {"correct": rate of `correct_field`, "n", "fields": {field: mean}}."""
    if len(captions) != len(truths):
        raise CM3LeonError(f"{len(captions)} captions but {len(truths)} ground-truth object lists")
    if not captions:
        raise CM3LeonError("no captions to check")
    if judge is None:
        from cm3leon.data.checker import caption_correct as judge
    results = [dict(judge(c, t)) for c, t in zip(captions, truths)]
    flags = _field_means(results)
    if correct_field not in flags:
        raise CM3LeonError(f"caption checker result has no field {correct_field!r} (got {sorted(flags)})")
    return {"correct": flags[correct_field], "n": len(results), "fields": flags}
