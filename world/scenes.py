"""Scenes whose truth is known per patch: the ground-truth world.

A scene is a textured background (a noun: grass, sky, ...) and 1-4 objects, each with a
colour, a shape, a size and a pattern, every one a word of the 2of12 list. Objects may
overlap (later ones occlude earlier ones, never more than ``MAX_OVERLAP`` of either). Scenes
are drawn from a seed and rendered as lossless PNGs, wider than tall, so the encoder's own
resize (shortest side) and centre crop both act on them.

For every image and every patch of the encoder's grid *after that resize and crop* the
ground truth records the share of the patch each region covers; from it:
- ``true_words``: the words of every region covering at least ``MIN_AREA`` of the patch;
- ``dominant``: the word covering the largest share of the patch (a word's share is the sum
  over the regions it describes); ties, as a colour and a shape of one object always are,
  go by the fixed family order ``FAMILY_ORDER`` (the object's noun first, as the paper's
  examples label patches with the object's name). Fixed before any result was looked at.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 70, 220),
           "yellow": (245, 220, 40), "orange": (250, 140, 20), "purple": (140, 50, 180),
           "pink": (250, 130, 190), "brown": (130, 80, 40), "black": (20, 20, 20),
           "white": (250, 250, 250), "gray": (130, 130, 130)}
SHAPES = ("circle", "square", "triangle", "star", "heart", "diamond")
SIZES = ("big", "small")
PATTERNS = ("plain", "striped", "dotted")
# background noun -> (base colour, object colours it would hide)
BACKGROUNDS = {"grass": ((70, 140, 50), {"green"}), "sky": ((120, 170, 235), {"blue"}),
               "sand": ((222, 196, 140), {"yellow", "brown"}),
               "water": ((35, 85, 160), {"blue"}), "snow": ((238, 240, 246), {"white", "gray"}),
               "brick": ((150, 62, 45), {"red", "brown"})}
FAMILIES = {"shape": SHAPES, "background": tuple(BACKGROUNDS), "colour": tuple(COLOURS),
            "pattern": PATTERNS, "size": SIZES}
FAMILY_ORDER = ("shape", "background", "colour", "pattern", "size")
VOCAB = tuple(w for f in FAMILY_ORDER for w in FAMILIES[f])  # the world's 28 patch words
_RANK = {w: i for i, w in enumerate(VOCAB)}
MIN_AREA = 0.1
MAX_OVERLAP = 0.3
NUMBERS = ("zero", "one", "two", "three", "four")


@dataclass
class Obj:
    colour: str
    shape: str
    size: str
    pattern: str
    cx: float
    cy: float
    r: float

    @property
    def words(self) -> list[str]:
        return [self.shape, self.colour, self.pattern, self.size]


@dataclass
class Scene:
    background: str
    objects: list[Obj] = field(default_factory=list)
    width: int = 128
    height: int = 96
    texture_seed: int = 0


def _shape_mask(shape: str, cx: float, cy: float, r: float, size: tuple[int, int]) -> Image.Image:
    m = Image.new("L", size, 0)
    d = ImageDraw.Draw(m)
    if shape == "circle":
        d.ellipse([cx - r, cy - r, cx + r, cy + r], fill=255)
    elif shape == "square":
        s = r * 0.9
        d.rectangle([cx - s, cy - s, cx + s, cy + s], fill=255)
    elif shape == "triangle":
        d.polygon([(cx, cy - r), (cx - r, cy + r * 0.8), (cx + r, cy + r * 0.8)], fill=255)
    elif shape == "diamond":
        d.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=255)
    elif shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a)))
        d.polygon(pts, fill=255)
    elif shape == "heart":
        q = r * 0.5
        d.ellipse([cx - 2 * q, cy - 1.5 * q, cx, cy + 0.5 * q], fill=255)
        d.ellipse([cx, cy - 1.5 * q, cx + 2 * q, cy + 0.5 * q], fill=255)
        d.polygon([(cx - 1.95 * q, cy - 0.2 * q), (cx + 1.95 * q, cy - 0.2 * q), (cx, cy + 2 * q)],
                  fill=255)
    else:
        raise ValueError(shape)
    return m


def sample_scene(rng: random.Random, width: int = 128, height: int = 96) -> Scene:
    bg = rng.choice(list(BACKGROUNDS))
    scene = Scene(bg, [], width, height, rng.randrange(1 << 30))
    hidden = BACKGROUNDS[bg][1]
    masks: list[np.ndarray] = []
    want = rng.randint(1, 4)
    tries = 0
    while len(scene.objects) < want and tries < 50:
        tries += 1
        size = rng.choice(SIZES)
        r = height * (rng.uniform(0.22, 0.3) if size == "big" else rng.uniform(0.1, 0.14))
        # inside the centre crop of a shortest-side resize, whatever the encoder's size
        margin_x = (width - height) / 2
        cx = rng.uniform(margin_x + r, width - margin_x - r)
        cy = rng.uniform(r, height - r)
        o = Obj(rng.choice([c for c in COLOURS if c not in hidden]), rng.choice(SHAPES), size,
                rng.choice(PATTERNS), cx, cy, r)
        m = np.asarray(_shape_mask(o.shape, cx, cy, r, (width, height))) > 0
        if any((m & p).sum() > MAX_OVERLAP * min(m.sum(), p.sum()) for p in masks):
            continue
        masks.append(m)
        scene.objects.append(o)
    return scene


@functools.lru_cache(maxsize=16)
def _background(name: str, w: int, h: int, texture_seed: int) -> np.ndarray:
    """The textured background alone (float, read-only), cached: a CLIP shape group renders
    the same background for each of its scenes."""
    rng = np.random.default_rng(texture_seed)
    base = np.array(BACKGROUNDS[name][0], dtype=np.float32)
    img = np.broadcast_to(base, (h, w, 3)).copy()
    yy, xx = np.mgrid[0:h, 0:w]
    if name == "grass":  # short dark and light blades
        for _ in range(w * h // 40):
            x, y = rng.integers(0, w), rng.integers(0, h - 4)
            img[y:y + 4, x] = base * rng.choice([0.7, 1.25])
    elif name == "sky":  # lighter towards the horizon
        img *= (0.85 + 0.3 * yy / h)[..., None]
    elif name == "sand":
        img *= rng.uniform(0.85, 1.1, size=(h, w, 1))
    elif name == "water":  # light wavy lines
        wave = np.sin(xx / 5.0 + rng.uniform(0, 6)) * 2 + yy
        img[(wave.astype(int) % 9) == 0] = base * 1.8
    elif name == "snow":
        spots = rng.random((h, w)) < 0.03
        img[spots] = (200, 205, 215)
    elif name == "brick":  # mortar lines of a running bond
        mortar = (yy % 10 == 0) | (((xx + 10 * ((yy // 10) % 2)) % 20) == 0)
        img[mortar] = (200, 200, 195)
    img.flags.writeable = False
    return img


def render(scene: Scene) -> tuple[Image.Image, np.ndarray]:
    """-> (RGB image, region map: 0 = background, k = objects[k-1]; later objects on top)."""
    w, h = scene.width, scene.height
    img = _background(scene.background, w, h, scene.texture_seed).copy()
    yy, xx = np.mgrid[0:h, 0:w]
    regions = np.zeros((h, w), dtype=np.uint8)
    for k, o in enumerate(scene.objects, start=1):
        m = np.asarray(_shape_mask(o.shape, o.cx, o.cy, o.r, (w, h))) > 0
        col = np.array(COLOURS[o.colour], dtype=np.float32)
        dark = col * 0.55 if o.colour not in ("black",) else col + 90
        fill = np.broadcast_to(col, (h, w, 3)).copy()
        if o.pattern == "striped":
            fill[((xx + yy) // 3) % 2 == 0] = dark
        elif o.pattern == "dotted":
            fill[((xx % 6) < 2) & ((yy % 6) < 2)] = dark
        img[m] = fill[m]
        regions[m] = k
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)), regions


def crop_geometry(width: int, height: int, image_size: int) -> dict:
    """Where the encoder's ``Resize(image_size)`` (shortest side) + ``CenterCrop`` put the
    image, computed as torchvision does it."""
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(image_size * long / short)
    rw, rh = (image_size, new_long) if width <= height else (new_long, image_size)
    left = int(round((rw - image_size) / 2.0))
    top = int(round((rh - image_size) / 2.0))
    return {"resized": [rw, rh], "offset": [left, top], "image_size": image_size}


def patch_areas(regions: np.ndarray, n_regions: int, geom: dict, grid: tuple[int, int]) -> np.ndarray:
    """(gh, gw, n_regions) share of each patch covered by each region: every source pixel's
    centre is mapped through the resize and crop and counted in the patch it lands in."""
    h, w = regions.shape
    rw, rh = geom["resized"]
    left, top = geom["offset"]
    s = geom["image_size"]
    gh, gw = grid
    x = (np.arange(w) + 0.5) * rw / w - left
    y = (np.arange(h) + 0.5) * rh / h - top
    px = np.floor(x * gw / s).astype(int)
    py = np.floor(y * gh / s).astype(int)
    ok = ((px >= 0) & (px < gw))[None, :] & ((py >= 0) & (py < gh))[:, None]
    pidx = (py[:, None] * gw + px[None, :])[ok]
    counts = np.zeros((gh * gw, n_regions))
    np.add.at(counts, (pidx, regions[ok].astype(int)), 1.0)
    return (counts / counts.sum(axis=1, keepdims=True).clip(min=1)).reshape(gh, gw, n_regions)


def region_words(scene: Scene) -> list[list[str]]:
    return [[scene.background]] + [o.words for o in scene.objects]


def patch_truth(areas: np.ndarray, words: list[list[str]]) -> tuple[list, list]:
    """-> (true words per patch, dominant word per patch), both as row-major lists."""
    gh, gw, _ = areas.shape
    true, dom = [], []
    for a in areas.reshape(gh * gw, -1):
        share: dict[str, float] = {}
        t = set()
        for k, frac in enumerate(a):
            for wd in words[k]:
                share[wd] = share.get(wd, 0.0) + float(frac)
                if frac >= MIN_AREA:
                    t.add(wd)
        true.append(sorted(t, key=_RANK.__getitem__))
        dom.append(max(share, key=lambda wd: (round(share[wd], 9), -_RANK[wd])))
    return true, dom


# --- text: captions and questions -------------------------------------------------------------

def _phrase(o: Obj, rng: random.Random, full: bool) -> str:
    parts = [o.size] if full or rng.random() < 0.5 else []
    parts.append(o.colour)
    if o.pattern != "plain" and (full or rng.random() < 0.5):
        parts.append(o.pattern)
    return "a " + " ".join(parts + [o.shape])


def caption(scene: Scene, rng: random.Random) -> str:
    objs = " and ".join(_phrase(o, rng, full=rng.random() < 0.5) for o in scene.objects)
    bg = scene.background
    form = rng.randrange(4)
    if form == 0:
        return f"{objs} on {bg}"
    if form == 1:
        return f"there is {objs} on {bg}"
    if form == 2:
        return f"{bg} with {objs}"
    return f"a picture of {objs}. the background is {bg}"


def _plural(shape: str) -> str:
    return shape + "s"


def questions(scene: Scene, rng: random.Random) -> list[tuple[str, str, str]]:
    """(type, question, one-word answer) pairs that need the picture."""
    out = [("background", "What is the background?", scene.background)]
    shapes = [o.shape for o in scene.objects]
    # the object is named by its pattern, which a single patch of the world's CLIP carries
    # (a probe on its patch tokens: 0.97), not by its shape, which none does (0.23, the
    # majority 0.26): "What color is the star?" cannot be answered from the visual tokens
    # beyond guessing one colour of the scene (docs/evidence-notes.md, "Pattern questions")
    patterns = [o.pattern for o in scene.objects]
    # every object that its pattern names gets asked about, and two colours are looked up:
    # several looked-up answers per conversation, as LLaVA-665k's VQA conversations have
    # many turns per image (one per scene left the lookup unlearnt in 630 steps)
    for o in scene.objects:
        if patterns.count(o.pattern) == 1:
            out.append(("color", f"What color is the {o.pattern} object?", o.colour))
    s = rng.choice(SHAPES)
    out.append(("count", f"How many {_plural(s)} are there?", NUMBERS[shapes.count(s)]))
    colours = {o.colour for o in scene.objects}
    asked: list[str] = []
    while len(asked) < 2:  # two different colours, each drawn among the scene's half the time
        c = rng.choice(sorted(colours)) if rng.random() < 0.5 else rng.choice(list(COLOURS))
        if c not in asked:
            asked.append(c)
            out.append(("exists", f"Is there a {c} object?", "yes" if c in colours else "no"))
    if len(scene.objects) == 2 and shapes[0] != shapes[1]:
        a, b = sorted(scene.objects, key=lambda o: o.cx)
        if b.cx - a.cx > (a.r + b.r) * 0.5:
            ref, ans = (b, a) if rng.random() < 0.5 else (a, b)
            side = "left" if ref is b else "right"
            out.append(("position", f"Which shape is {side} of the {ref.shape}?", ans.shape))
    return out


QUESTION_TYPES = ("background", "color", "count", "exists", "position")


# --- writing a world --------------------------------------------------------------------------

def make_world(out_dir: str | Path, n: int, seed: int, image_size: int, grid: tuple[int, int],
               start: int = 0, width: int = 128, height: int = 96) -> dict:
    """Scenes ``start .. start+n-1`` of the world ``seed`` under ``out_dir``: ``images/``,
    ``captions.json`` (LLaVA-Pretrain format), ``instruct.json`` (LLaVA-665k format, one
    multi-turn conversation per scene, its questions in a random order, plus one
    single-question row per question in ``questions.jsonl`` for evaluation) and ``ground_truth.jsonl`` (format in the README)."""
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    geom = crop_geometry(width, height, image_size)
    caps, inst, qs, truth = [], [], [], []
    for i in range(start, start + n):
        rng = random.Random(f"{seed}-{i}")
        scene = sample_scene(rng, width, height)
        img, regions = render(scene)
        rel = f"{i // 1000:04d}/{i:07d}.png"
        (out / "images" / rel).parent.mkdir(parents=True, exist_ok=True)
        img.save(out / "images" / rel)
        words = region_words(scene)
        areas = patch_areas(regions, len(words), geom, grid)
        true, dom = patch_truth(areas, words)
        sid = f"{i:07d}"
        truth.append({"id": sid, "image": rel, "size": [width, height], "crop": geom,
                      "grid": list(grid), "regions": words,
                      "objects": [vars(o) for o in scene.objects],
                      "areas": np.round(areas.reshape(-1, len(words)), 4).tolist(),
                      "true_words": true, "dominant": dom})
        caps.append({"id": sid, "image": rel, "conversations": [
            {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
            {"from": "gpt", "value": caption(scene, rng)}]})
        conv = []
        qa = questions(scene, rng)
        # asked in an order of their own per scene (its own RNG: the scenes, captions and
        # questions stay those of earlier worlds), the image always in the first turn; one
        # fixed order taught "the first answer is a background word"
        random.Random(f"{seed}-{i}-order").shuffle(qa)
        for j, (qt, q, a) in enumerate(qa):
            human = q  # every answer is one word: no LLaVA short-answer suffix needed
            conv += [{"from": "human", "value": ("<image>\n" + human) if j == 0 else human},
                     {"from": "gpt", "value": a}]
            qs.append({"id": f"{sid}-{j}", "image": rel, "type": qt, "question": human, "answer": a})
        inst.append({"id": sid, "image": rel, "conversations": conv})
    (out / "captions.json").write_text(json.dumps(caps))
    (out / "instruct.json").write_text(json.dumps(inst))
    _write_lines(out / "questions.jsonl", qs)
    _write_lines(out / "ground_truth.jsonl", truth)
    (out / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return {"images": n, "dir": str(out)}


def _write_lines(path: Path, rows: list[dict]) -> None:
    with open(path, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")


def read_truth(path: str | Path) -> dict[str, dict]:
    """ground_truth.jsonl -> {normalised image path: record}."""
    out = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            out[r["image"]] = r
    return out


def world_text(root: str | Path, documents: bool = False) -> list[str]:
    """Every sentence of a world folder, for the language model: captions and Q&A turns.
    With ``documents``, also one text per scene: its caption, then its questions, each with
    its answer, so that the LM learns to answer from what its context says (as a pretrained
    LLM answers questions about a text it was given); the sentences alone never need it."""
    root = Path(root)
    caps = {c["image"]: c["conversations"][1]["value"]
            for c in json.loads((root / "captions.json").read_text())}
    lines = list(caps.values())
    docs = []
    for it in json.loads((root / "instruct.json").read_text()):
        conv = it["conversations"]
        qa = [f"{h['value'].replace('<image>' + chr(10), '')} {g['value']}"
              for h, g in zip(conv[0::2], conv[1::2])]
        lines += qa
        docs.append(" ".join([caps[it["image"]], *qa]))
    return lines + (docs if documents else [])
