"""The shapes checker: recover the objects (shape, colour, size, grid cell) of an image by
program, and score images and captions against what was asked.

This is how generated images and captions are scored on the built-in dataset, so it aims to
be exact on clean renderings and honest on anything else:

1. every pixel is explained as a blend `background + a * (colour - background)` of the white
   background with one palette colour (the anti-aliasing model of the renderer); the colour
   with the smallest residual wins if that residual is under `color_tolerance`, giving a
   colour class and a coverage `a` in [0, 1] per pixel;
2. pixels with coverage >= 0.5 form 8-connected components per colour;
3. each component is compared with every shape, rendered by the renderer's own
   `shape_coverage` at the component's centroid and at the scale its area implies; the best
   soft IoU names the shape and is the detection's confidence;
4. the fitted box side gives the size (nearest of small / large, in log scale), its centre
   gives the grid cell.

Components too small, too large for any object, not surrounded by background, or fitting
no shape at all (IoU < min_confidence) are dropped, so noise, gradients and colour fields give
no detections rather than guesses; a compact blob whose outline fits no shape well enough
(IoU < shape_confidence, e.g. a blurred object) is kept with shape "unknown", so its colour,
size and place still count but no shape is claimed.
"""

from __future__ import annotations

import math
from functools import lru_cache
import random
from dataclasses import asdict, dataclass

import numpy as np

from cm3leon.data.shapes import (
    BACKGROUND, COLORS, GRID, POSITIONS, SHAPE_AREA_FRACTION, SHAPE_CENTROID_OFFSET, SHAPES, SIZE_FRACTION,
    ShapeObject, parse_caption, position_name, render_scene, sample_scene, shape_coverage,
)
from cm3leon.errors import CM3LeonError

_COLOR_NAMES = tuple(COLORS)
_PALETTE = np.asarray([COLORS[c] for c in _COLOR_NAMES], dtype=np.float64)  # (K, 3)
_BG = np.asarray(BACKGROUND, dtype=np.float64)
UNKNOWN_SHAPE = "unknown"  # a detection whose outline fits no shape well enough to name it
_MAX_WORK = 128  # larger inputs are box-downsampled to this side (the renderer's own anti-aliasing)
_MIN_WORK = 24  # smaller inputs are upsampled so the grid still has a few pixels per cell
_TEMPLATE_BLUR = (0.6, 1.0)  # Gaussian sigmas (working pixels) also tried for each shape


@dataclass(frozen=True)
class Detection:
    """An object found in an image. bbox is [x0, y0, x1, y1] in the input image's pixels;
    confidence is the soft IoU of the object with its fitted shape (1 = exact rendering);
    shape is UNKNOWN_SHAPE ("unknown") when that fit is too poor to name the shape."""

    shape: str
    color: str
    size: str
    cell: tuple[int, int]
    position: str
    bbox: tuple[float, float, float, float]
    confidence: float
    area: float  # covered pixels at the working resolution

    def key(self) -> tuple[str, str, str, tuple[int, int]]:
        return (self.shape, self.color, self.size, self.cell)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["cell"], d["bbox"] = list(self.cell), list(self.bbox)
        return d


def _to_array(image) -> np.ndarray:
    """PIL image or array (uint8 0..255, or float 0..1), HxW / HxWx3 / HxWx4 -> float64 HxWx3
    at the working resolution."""
    from PIL import Image

    if isinstance(image, Image.Image):
        pil = image.convert("RGB")
    elif isinstance(image, np.ndarray):
        arr = image
        if arr.ndim == 2:
            arr = np.repeat(arr[..., None], 3, axis=2)
        if arr.ndim != 3 or arr.shape[2] not in (3, 4) or arr.shape[0] == 0 or arr.shape[1] == 0:
            raise CM3LeonError(f"image: expected an HxW, HxWx3 or HxWx4 array, got shape {image.shape}")
        arr = arr[..., :3]
        if arr.dtype == np.uint8:
            pass
        elif np.issubdtype(arr.dtype, np.floating):
            if not np.isfinite(arr).all():
                raise CM3LeonError("image: float array contains NaN or infinity")
            arr = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
        else:
            raise CM3LeonError(f"image: expected a uint8 (0..255) or float (0..1) array, got dtype {arr.dtype}")
        pil = Image.fromarray(np.ascontiguousarray(arr))
    else:
        raise CM3LeonError(f"image: expected a PIL image or a numpy array, got {type(image).__name__}")
    w, h = pil.size
    side = max(w, h)
    work = min(max(side, _MIN_WORK), _MAX_WORK)
    if (w, h) != (work, work):
        pil = pil.resize((work, work), Image.BOX if side > work else Image.BILINEAR)
    return np.asarray(pil, dtype=np.float64)


def _classify(rgb: np.ndarray, color_tolerance: float) -> tuple[np.ndarray, np.ndarray]:
    """Per pixel: palette index (-1 = none) and coverage in [0, 1] under the blend model."""
    d = rgb - _BG  # (H, W, 3)
    axis = _PALETTE - _BG  # (K, 3)
    alpha = np.clip(np.einsum("hwc,kc->hwk", d, axis) / (axis * axis).sum(1), 0.0, 1.0)  # (H, W, K)
    resid = np.linalg.norm(d[:, :, None, :] - alpha[..., None] * axis, axis=-1)  # (H, W, K)
    best = resid.argmin(-1)
    cov = np.take_along_axis(alpha, best[..., None], -1)[..., 0]
    ok = np.take_along_axis(resid, best[..., None], -1)[..., 0] < color_tolerance
    return np.where(ok, best, -1), np.where(ok, cov, 0.0)


_NEIGHBOURS = [(dy, dx) for dy in (-1, 0, 1) for dx in (-1, 0, 1) if (dy, dx) != (0, 0)]


def _label(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal non-negative class: label = smallest flat index in the
    component, -1 elsewhere. Min-propagation with pointer jumping (no scipy needed)."""
    h, w = classes.shape
    big = h * w
    lab = np.where(classes >= 0, np.arange(big).reshape(h, w), big)
    cls_p = np.pad(classes, 1, constant_values=-1)
    same = [(cls_p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w] == classes) & (classes >= 0) for dy, dx in _NEIGHBOURS]
    while True:
        lab_p = np.pad(lab, 1, constant_values=big)
        new = lab
        for (dy, dx), s in zip(_NEIGHBOURS, same):
            new = np.where(s, np.minimum(new, lab_p[1 + dy:1 + dy + h, 1 + dx:1 + dx + w]), new)
        flat = np.append(new.ravel(), big)
        new = flat[new]  # jump to the label of the label (same component, never larger)
        if np.array_equal(new, lab):
            return np.where(lab < big, lab, -1)
        lab = new


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    """Separable Gaussian blur (radius 2 sigma), zero outside."""
    r = max(1, math.ceil(2 * sigma))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    p = np.pad(a, r)
    a = sum(w * p[:, i:i + a.shape[1]] for i, w in enumerate(k))[r:-r]
    p = np.pad(a, ((r, r), (0, 0)))
    return sum(w * p[i:i + a.shape[0]] for i, w in enumerate(k))


def _fit_shape(obs: np.ndarray, x0: int, y0: int) -> tuple[str, float, float, float, float]:
    """Best shape for the soft mask `obs` (patch at x0, y0): (shape, iou, cx, cy, side).

    Each shape is placed at the observed centroid, scaled to the observed area, and compared
    sharp and slightly blurred (generated and re-encoded images are soft; blur keeps the area)."""
    area = obs.sum()
    ys, xs = np.mgrid[0:obs.shape[0], 0:obs.shape[1]]
    mx = x0 + 0.5 + (obs * xs).sum() / area
    my = y0 + 0.5 + (obs * ys).sum() / area
    best = ("", -1.0, 0.0, 0.0, 0.0)
    for shape in SHAPES:
        side = math.sqrt(area / SHAPE_AREA_FRACTION[shape])
        ox, oy = SHAPE_CENTROID_OFFSET[shape]
        cx, cy = mx - ox * side, my - oy * side
        # a patch holding both the template (with room for blur) and the observation
        tx0 = min(x0, math.floor(cx - side / 2) - 3)
        ty0 = min(y0, math.floor(cy - side / 2) - 3)
        tx1 = max(x0 + obs.shape[1], math.ceil(cx + side / 2) + 3)
        ty1 = max(y0 + obs.shape[0], math.ceil(cy + side / 2) + 3)
        sharp = shape_coverage(shape, cx, cy, side, tx0, ty0, tx1 - tx0, ty1 - ty0)
        o = np.zeros_like(sharp)
        o[y0 - ty0:y0 - ty0 + obs.shape[0], x0 - tx0:x0 - tx0 + obs.shape[1]] = obs
        for tmpl in (sharp,) + tuple(_blur(sharp, s) for s in _TEMPLATE_BLUR):
            iou = float(np.minimum(o, tmpl).sum() / max(np.maximum(o, tmpl).sum(), 1e-9))
            if iou > best[1]:
                best = (shape, iou, cx, cy, side)
    return best


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 (8-neighbour) binary dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    rows = out.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def detect_objects(image, color_tolerance: float = 48.0, min_confidence: float = 0.4,
                   shape_confidence: float = 0.7, min_background: float = 0.6) -> list[Detection]:
    """The objects in `image` (PIL image or array of any size), in reading order.

    color_tolerance: largest RGB distance (0..255 scale) of a pixel from the line between the
    background and its palette colour; min_confidence: smallest soft IoU with the best-fitting
    shape for a component to count as an object at all; shape_confidence: smallest IoU for the
    shape to be named (below it the detection's shape is "unknown": a blob of the right colour
    in the right place, but no shape is claimed); min_background: smallest fraction of
    background pixels in the ring around the object."""
    rgb = _to_array(image)
    work = rgb.shape[0]
    in_w, in_h = (image.size if hasattr(image, "size") and not isinstance(image, np.ndarray)
                  else (image.shape[1], image.shape[0]))
    classes, cov = _classify(rgb, color_tolerance)
    bg_like = np.linalg.norm(rgb - _BG, axis=-1) < color_tolerance
    hard = np.where(cov >= 0.5, classes, -1)
    labels = _label(hard)
    cell = work / GRID
    small_side, large_side = SIZE_FRACTION["small"] * cell, SIZE_FRACTION["large"] * cell
    min_area = 0.4 * min(SHAPE_AREA_FRACTION.values()) * small_side ** 2
    max_side = 1.35 * large_side
    size_split = math.sqrt(small_side * large_side)
    found = []
    for lab in np.unique(labels[labels >= 0]):
        comp = labels == lab
        if comp.sum() < min_area:  # specks: noise or compression artefacts
            continue
        k = int(classes.flat[lab])
        rows, cols = np.nonzero(comp)
        y0, y1 = max(rows.min() - 2, 0), min(rows.max() + 3, work)
        x0, x1 = max(cols.min() - 2, 0), min(cols.max() + 3, work)
        c = comp[y0:y1, x0:x1]
        # the component plus its same-colour anti-aliased rim (coverage < 0.5) one pixel around
        grown = _dilate(c)
        rim_ok = (classes[y0:y1, x0:x1] == k) & (hard[y0:y1, x0:x1] < 0)
        obs = np.where(c | (grown & rim_ok), cov[y0:y1, x0:x1], 0.0)
        # an object lies on the background: the ring one pixel beyond the rim must be mostly
        # background-coloured (rejects colour fields that merely pass through a palette colour)
        ring = _dilate(grown) & ~grown
        bg_frac = float(bg_like[y0:y1, x0:x1][ring].mean()) if ring.any() else 0.0
        if bg_frac < min_background:
            continue
        shape, iou, cx, cy, side = _fit_shape(obs, x0, y0)
        if iou < min_confidence or side > max_side:
            continue
        row = min(max(int(cy // cell), 0), GRID - 1)
        col = min(max(int(cx // cell), 0), GRID - 1)
        sx, sy = in_w / work, in_h / work
        bbox = tuple(round(float(v), 2) for v in ((cx - side / 2) * sx, (cy - side / 2) * sy,
                                           (cx + side / 2) * sx, (cy + side / 2) * sy))
        found.append(Detection(shape=shape if iou >= shape_confidence else UNKNOWN_SHAPE, color=_COLOR_NAMES[k],
                               size="small" if side < size_split else "large",
                               cell=(row, col), position=position_name((row, col)), bbox=bbox,
                               confidence=round(iou, 4), area=round(float(obs.sum()), 2)))
    return sorted(found, key=lambda d: (d.cell, -d.confidence))


# ---- scoring ----------------------------------------------------------------------------

def _as_object(o) -> ShapeObject:
    if isinstance(o, ShapeObject):
        return o
    if isinstance(o, dict):
        return ShapeObject.from_dict(o)
    raise CM3LeonError(f"truth object: expected a ShapeObject or an annotation dict, got {type(o).__name__}")


def score_scene(detections: list[Detection], truth_objects: list) -> dict:
    """Exact matching of detections to the true objects (all of shape, colour, size, cell).

    Returns {"matches": [(truth index, detection index)], "num_truth", "num_detected",
    "num_matched", "precision", "recall", "exact"} where exact means every object found
    and nothing else."""
    truth = [_as_object(o) for o in truth_objects]
    free = list(range(len(detections)))
    matches = []
    for i, t in enumerate(truth):
        key = (t.shape, t.color, t.size, t.cell)
        j = next((j for j in free if detections[j].key() == key), None)
        if j is not None:
            free.remove(j)
            matches.append((i, j))
    n_t, n_d, n_m = len(truth), len(detections), len(matches)
    return {"matches": matches, "num_truth": n_t, "num_detected": n_d, "num_matched": n_m,
            "precision": n_m / n_d if n_d else float(n_t == 0),
            "recall": n_m / n_t if n_t else float(n_d == 0),
            "exact": n_m == n_t == n_d}


def _requested(caption_or_objects) -> list[dict]:
    """Normalise a caption or a list of objects / dicts to parse_caption's dicts."""
    if isinstance(caption_or_objects, str):
        req = parse_caption(caption_or_objects)
        if not req:
            raise CM3LeonError(f"caption names no object (\"[size] colour shape\"): {caption_or_objects!r}")
        return req
    out = []
    for o in caption_or_objects:
        if isinstance(o, ShapeObject):
            out.append({"shape": o.shape, "color": o.color, "size": o.size, "position": o.position,
                        "cell": list(o.cell), "relation": None, "relation_to": None})
        elif isinstance(o, dict):
            if o.get("shape") not in SHAPES or o.get("color") not in COLORS:
                raise CM3LeonError(f"requested object {o!r}: needs 'shape' in {SHAPES} and 'color' in {tuple(COLORS)}")
            cell, pos = o.get("cell"), o.get("position")
            if cell is None and pos is not None:
                if pos not in POSITIONS:
                    raise CM3LeonError(f"requested object {o!r}: unknown position {pos!r}; "
                                       f"expected one of {tuple(POSITIONS)}")
                cell = POSITIONS[pos]
            elif cell is not None:
                pos = position_name(tuple(cell))
            out.append({"shape": o["shape"], "color": o["color"], "size": o.get("size"), "position": pos,
                        "cell": list(cell) if cell is not None else None,
                        "relation": o.get("relation"), "relation_to": o.get("relation_to")})
        else:
            raise CM3LeonError(f"requested object: expected a ShapeObject or dict, got {type(o).__name__}")
    return out


def _relation_holds(rel: str, a: Detection, b: Detection) -> bool:
    if rel == "above":
        return a.cell[0] < b.cell[0]
    if rel == "below":
        return a.cell[0] > b.cell[0]
    if rel == "to the left of":
        return a.cell[1] < b.cell[1]
    return a.cell[1] > b.cell[1]


def _attr_hits(r: dict, d: Detection) -> tuple[bool, bool, bool, bool]:
    pos_ok = r["cell"] is None or tuple(r["cell"]) == d.cell
    size_ok = r["size"] is None or r["size"] == d.size
    return r["color"] == d.color, r["shape"] == d.shape, size_ok, pos_ok


def _assign(req: list[dict], dets: list[Detection]) -> tuple:
    """Optimal one-to-one assignment of requested objects to detections (None = unmatched),
    maximising agreement with colour weighted most; exact DP over subsets of detections."""

    weights = (8, 4, 1, 2)  # colour, shape, size, position
    gain = [[sum(w for w, hit in zip(weights, _attr_hits(r, d)) if hit) + 1e-3 for d in dets] for r in req]

    @lru_cache(maxsize=None)
    def best(i: int, used: int) -> tuple[float, tuple]:
        if i == len(req):
            return 0.0, ()
        s, a = best(i + 1, used)
        options = [(s, (None,) + a)]
        for j in range(len(dets)):
            if not used >> j & 1:
                s, a = best(i + 1, used | 1 << j)
                options.append((s + gain[i][j], (j,) + a))
        return max(options, key=lambda t: t[0])

    return best(0, 0)[1]


def check_prompt(image, caption_or_objects, **detect_kw) -> dict:
    """Does `image` show what was asked? `caption_or_objects` is a caption (parsed with
    `parse_caption`) or a list of ShapeObject / object dicts.

    The requested objects are matched one-to-one to detections (best total agreement, colour
    weighted most); a requested object with no detection fails every attribute. Returns
    {"colour_ok", "shape_ok", "size_ok", "position_ok", "count_ok", "all_ok", "num_requested",
    "num_detected", "per_object": [...], "detections": [...]}; size and position are checked
    only where stated, relations ("above", ...) count towards position_ok."""
    req = _requested(caption_or_objects)
    dets = sorted(detect_objects(image, **detect_kw), key=lambda d: -d.confidence)[:9]
    best = _assign(req, dets)
    per_object = []
    for i, (r, j) in enumerate(zip(req, best)):
        if j is None:
            hits = (False, False, False, False)
        else:
            hits = _attr_hits(r, dets[j])
            if r["relation"] and r["relation_to"] is not None and best[r["relation_to"]] is not None:
                hits = hits[:3] + (hits[3] and _relation_holds(r["relation"], dets[j], dets[best[r["relation_to"]]]),)
            elif r["relation"]:
                hits = hits[:3] + (False,)
        per_object.append({"requested": r, "detection": dets[j].to_dict() if j is not None else None,
                           "colour_ok": hits[0], "shape_ok": hits[1], "size_ok": hits[2], "position_ok": hits[3]})
    res = {k: all(p[k] for p in per_object) for k in ("colour_ok", "shape_ok", "size_ok", "position_ok")}
    res["count_ok"] = len(dets) == len(req)
    res["all_ok"] = all(res.values())
    res.update(num_requested=len(req), num_detected=len(dets), per_object=per_object,
               detections=[d.to_dict() for d in dets])
    return res


def caption_correct(caption_text: str, truth_objects: list) -> dict:
    """Does a generated caption name the right objects? Compares the (colour, shape) pairs the
    caption names (`parse_caption`) with the truth, as multisets.

    Returns {"colour_ok": the set of colours named == the true set, "shape_ok": same for
    shapes, "all_ok": the named pairs == the true pairs (as multisets), "size_ok": every
    stated size right (True when none stated), "precision", "recall" of the pairs, "named"}."""
    truth = [_as_object(o) for o in truth_objects]
    named = parse_caption(caption_text) if isinstance(caption_text, str) else None
    if named is None:
        raise CM3LeonError(f"caption_correct: expected a caption string, got {type(caption_text).__name__}")
    pairs = [(n["color"], n["shape"]) for n in named]
    left = [(t.color, t.shape, t.size) for t in truth]
    matched, size_ok = 0, True
    for n in named:
        hit = next((x for x in left if x[:2] == (n["color"], n["shape"])), None)
        if hit is not None:
            left.remove(hit)
            matched += 1
            size_ok &= n["size"] is None or n["size"] == hit[2]
        else:
            size_ok &= n["size"] is None
    return {
        "colour_ok": bool(named) and {p[0] for p in pairs} == {t.color for t in truth},
        "shape_ok": bool(named) and {p[1] for p in pairs} == {t.shape for t in truth},
        "all_ok": bool(named) and sorted(pairs) == sorted((t.color, t.shape) for t in truth),
        "size_ok": size_ok,
        "precision": matched / len(named) if named else 0.0,
        "recall": matched / len(truth) if truth else float(not named),
        "named": pairs,
    }


# ---- self-measurement -------------------------------------------------------------------

def evaluate_on_rendered(num: int = 1000, size: int = 64, seed: int = 1234, max_objects: int = 3) -> dict:
    """Render `num` random scenes at `size` px and measure how exactly the checker recovers
    them: object recall / precision (all four attributes right), scene accuracy, and
    breakdowns by object size, objects per scene, shape and colour; a few failures listed."""
    from cm3leon.utils.logging import progress

    if not isinstance(num, int) or num < 1:
        raise CM3LeonError(f"--num: number of scenes must be a positive integer, got {num!r}")
    rng = random.Random(f"cm3leon-checker:{seed}")
    tot = {"truth": 0, "detected": 0, "matched": 0, "scenes_exact": 0}
    by: dict[str, dict[str, list[int]]] = {"size": {}, "count": {}, "shape": {}, "color": {}}
    failures = []
    with progress(total=num, desc=f"checker {size}px", unit="scene") as bar:
        for _ in range(num):
            objects = sample_scene(rng, max_objects)
            dets = detect_objects(render_scene(objects, size))
            s = score_scene(dets, objects)
            tot["truth"] += s["num_truth"]
            tot["detected"] += s["num_detected"]
            tot["matched"] += s["num_matched"]
            tot["scenes_exact"] += s["exact"]
            hit = {i for i, _ in s["matches"]}
            for i, o in enumerate(objects):
                for key, val in (("size", o.size), ("count", str(len(objects))),
                                 ("shape", o.shape), ("color", o.color)):
                    cnt = by[key].setdefault(val, [0, 0])
                    cnt[0] += i in hit
                    cnt[1] += 1
            if not s["exact"] and len(failures) < 10:
                failures.append({"truth": [o.to_dict() for o in objects], "detected": [d.to_dict() for d in dets]})
            bar.update(1)
    return {
        "size": size, "num_scenes": num, "num_objects": tot["truth"], "num_detected": tot["detected"],
        "object_recall": tot["matched"] / tot["truth"],
        "object_precision": tot["matched"] / tot["detected"] if tot["detected"] else 0.0,
        "scene_accuracy": tot["scenes_exact"] / num,
        **{f"recall_by_{k}": {v: round(c[0] / c[1], 4) for v, c in sorted(d.items())} for k, d in by.items()},
        "failures": failures,
    }
