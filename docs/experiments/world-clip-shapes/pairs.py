"""Caption against the same caption with shapes changed (pairs), and a one-object scene's shape
chosen among six full captions: python pairs.py CLIP_FOLDER EVIDENCE_FOLDER/work/world-test"""
import random
import sys
from dataclasses import replace
from pathlib import Path

import torch

from pipeline.encoders import load_encoder
from world import scenes
from world.metrics import pixels_of
from world.models import _scene_of


def shape_negative(scene, rng):
    objs = list(scene.objects)
    pairs = [
        (i, j)
        for i in range(len(objs))
        for j in range(i + 1, len(objs))
        if objs[i].shape != objs[j].shape
    ]
    if pairs and rng.random() < 0.5:
        i, j = rng.choice(pairs)
        objs[i], objs[j] = (
            replace(objs[i], shape=objs[j].shape),
            replace(objs[j], shape=objs[i].shape),
        )
    else:
        i = rng.randrange(len(objs))
        objs[i] = replace(
            objs[i], shape=rng.choice([s for s in scenes.SHAPES if s != objs[i].shape])
        )
    return replace(scene, objects=objs)



enc = load_encoder(f"local-dir:{sys.argv[1]}")
root = Path(sys.argv[2])
recs = list(scenes.read_truth(root / "ground_truth.jsonl").values())[:400]
with torch.inference_mode():
    img = enc.model.encode_image(
        pixels_of(root, [r["image"] for r in recs], enc.preprocess), normalize=True
    )
    for kind in ("swap", "replace", "any"):
        hits = []
        for k, r in enumerate(recs):
            sc = _scene_of(r)
            rng = random.Random(k)
            neg = shape_negative(sc, rng)
            if kind == "swap" and sorted(o.shape for o in neg.objects) != sorted(
                o.shape for o in sc.objects
            ):
                continue
            if kind == "replace" and sorted(o.shape for o in neg.objects) == sorted(
                o.shape for o in sc.objects
            ):
                continue
            t = enc.model.encode_text(
                enc.tokenizer(
                    [scenes.caption(sc, random.Random(k)), scenes.caption(neg, random.Random(k))]
                ),
                normalize=True,
            )
            s = img[k] @ t.T
            hits.append(float(s[0] > s[1]))
        print(kind, len(hits), sum(hits) / len(hits))
    # single-object scenes: shape zero-shot with "a {colour} {shape}" prompts
    hits = []
    for k, r in enumerate(recs):
        sc = _scene_of(r)
        if len(sc.objects) != 1:
            continue
        o = sc.objects[0]
        t = enc.model.encode_text(
            enc.tokenizer([f"a {o.colour} {s} on {sc.background}" for s in scenes.SHAPES]),
            normalize=True,
        )
        hits.append(scenes.SHAPES[int((img[k] @ t.T).argmax())] == o.shape)
    print(
        "single-object shape with colour+bg prompt",
        len(hits),
        sum(hits) / len(hits),
        "chance",
        1 / len(scenes.SHAPES),
    )
