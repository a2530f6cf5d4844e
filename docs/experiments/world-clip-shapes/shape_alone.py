"""Can the world CLIP's vision tower (same architecture, from scratch) learn shapes when told
directly? Multi-label shape presence from the pooled embedding, BCE, 300 steps."""

import json
import sys
import time
from pathlib import Path

import open_clip
import torch

from seacore.quiet import building_random_model
from world import scenes
from world.metrics import pixels_of
from world.models import ClipSpec

WORK, steps = sys.argv[1], int(sys.argv[2])
size = int(sys.argv[3]) if len(sys.argv) > 3 else 64
spec = ClipSpec(image_size=size)
open_clip.factory._MODEL_CONFIGS["w"] = spec.model_cfg()
torch.manual_seed(0)
with building_random_model():
    model, _, pre = open_clip.create_model_and_transforms("w")
vis = model.visual
S = list(scenes.SHAPES)


def load(root):
    root = Path(root)
    recs = list(scenes.read_truth(root / "ground_truth.jsonl").values())
    y = torch.zeros(len(recs), len(S))
    for i, r in enumerate(recs):
        for o in r["objects"]:
            y[i, S.index(o["shape"])] = 1
    return pixels_of(root, [r["image"] for r in recs], pre), y


Xtr, ytr = load(f"{WORK}/world-train")
Xte, yte = load(f"{WORK}/world-test")
head = torch.nn.Linear(spec.embed_dim, len(S))
opt = torch.optim.AdamW(list(vis.parameters()) + list(head.parameters()), lr=1e-3, weight_decay=0.1)
g = torch.Generator().manual_seed(0)
t = time.time()
for step in range(steps):
    idx = torch.randint(len(Xtr), (128,), generator=g)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(head(vis(Xtr[idx])), ytr[idx])
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 50 == 0:
        print(step, round(float(loss), 3), round(time.time() - t), flush=True)
vis.eval()
with torch.no_grad():
    p = head(vis(Xte))
best = p.argmax(1)
top1 = float(yte[torch.arange(len(yte)), best].mean())
acc = float(((p > 0) == (yte > 0)).float().mean())
print(
    json.dumps(
        {
            "steps": steps,
            "size": size,
            "top1_present": round(top1, 3),
            "chance": round(float(yte.mean()), 3),
            "per_label_acc": round(acc, 3),
        }
    )
)
