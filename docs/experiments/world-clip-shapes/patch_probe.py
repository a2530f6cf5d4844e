"""Probe on the frozen VisionTower features (layer -2): per patch, predict the shape, colour
and pattern of the object covering most of the patch; train on world-train patches, test on
world-test. Also the same probe on raw pixel patches (8x8x3) as a reference.
Arguments: CLIP folder, evidence work folder, [layer, default -2], [linear | mlp, default
linear: ``mlp`` is two hidden layers of 512 and 256, 40 epochs of AdamW]."""

import json
import sys
from pathlib import Path

import numpy as np
import torch

from pipeline.encoders import load_encoder
from trainer.model import VisionTower
from world import scenes
from world.metrics import pixels_of

enc = load_encoder(f"local-dir:{sys.argv[1]}")
WORK = sys.argv[2]
LAYER = int(sys.argv[3]) if len(sys.argv) > 3 else -2
PROBE = sys.argv[4] if len(sys.argv) > 4 else "linear"
tower = VisionTower(enc.model.visual, LAYER).eval()


def data(root, n):
    root = Path(root)
    recs = list(scenes.read_truth(root / "ground_truth.jsonl").values())[:n]
    with torch.inference_mode():
        px = pixels_of(root, [r["image"] for r in recs], enc.preprocess)
        feats = torch.cat([tower(px[i : i + 64]) for i in range(0, len(px), 64)])
    X, Xp, ys, yc, yp = [], [], [], [], []
    for k, r in enumerate(recs):
        for p in range(len(r["areas"])):
            a = r["areas"][p]
            j = int(np.argmax(a))
            if j == 0 or a[j] < 0.5:
                continue  # background-dominated patch
            o = r["objects"][j - 1]
            X.append(feats[k, p].numpy())
            ys.append(list(scenes.SHAPES).index(o["shape"]))
            yc.append(list(scenes.COLOURS).index(o["colour"]))
            yp.append(list(scenes.PATTERNS).index(o["pattern"]))
            gy, gx = divmod(p, 8)
            Xp.append(px[k, :, gy * 8 : gy * 8 + 8, gx * 8 : gx * 8 + 8].reshape(-1).numpy())
    return np.array(X), np.array(Xp), np.array(ys), np.array(yc), np.array(yp)


tr = data(f"{WORK}/world-train", 1500)
te = data(f"{WORK}/world-test", 300)


def fit_linear(Xtr, ytr, Xte, yte):
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-6
    Xtr, Xte = (Xtr - mu) / sd, (Xte - mu) / sd
    W = torch.nn.Linear(Xtr.shape[1], int(max(ytr.max(), yte.max())) + 1)
    opt = torch.optim.LBFGS(W.parameters(), max_iter=300, line_search_fn="strong_wolfe")
    yt = torch.tensor(ytr)

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(W(Xtr), yt) + 1e-3 * W.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return round(float((W(Xte).argmax(1).numpy() == yte).mean()), 3)


def fit_mlp(Xtr, ytr, Xte, yte):
    Xtr, Xte = torch.tensor(Xtr, dtype=torch.float32), torch.tensor(Xte, dtype=torch.float32)
    mu, sd = Xtr.mean(0), Xtr.std(0) + 1e-3
    Xtr, Xte, yt = (Xtr - mu) / sd, (Xte - mu) / sd, torch.tensor(ytr)
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(Xtr.shape[1], 512), torch.nn.GELU(),
                            torch.nn.Linear(512, 256), torch.nn.GELU(), torch.nn.Linear(256, 12))
    opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.05)
    for _ in range(40):
        perm = torch.randperm(len(Xtr))
        for k in range(0, len(Xtr), 256):
            b = perm[k:k + 256]
            loss = torch.nn.functional.cross_entropy(m(Xtr[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return round(float((m(Xte).argmax(1).numpy() == yte).mean()), 3)


fit_eval = fit_mlp if PROBE == "mlp" else fit_linear
out = {"probe": PROBE}
for name, i in (("feat", 0), ("pixels", 1)):
    for tname, j in (("shape", 2), ("colour", 3), ("pattern", 4)):
        out[f"{name}-{tname}"] = fit_eval(tr[i], tr[j], te[i], te[j])
maj = np.bincount(te[2]).max() / len(te[2])
print(
    json.dumps({"patches": [len(tr[2]), len(te[2])], "shape_majority": round(float(maj), 3), **out})
)
