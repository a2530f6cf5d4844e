"""Does one patch's raw pixels hold its object's shape? A small MLP probe per patch size.

Arguments: encoder input size, patch size, [share of the patch the object must cover, 0.3].
Fresh scenes (3,000 to train, 500 to test) through the encoder's shortest-side resize and
centre crop; a patch counts when an object is its largest region."""

import json
import random
import sys

import numpy as np
import torch
from PIL import Image

from world import scenes

S, P = int(sys.argv[1]), int(sys.argv[2])
THR = float(sys.argv[3]) if len(sys.argv) > 3 else 0.3
g = S // P
geom = scenes.crop_geometry(128, 96, S)


def data(seed, n):
    X, ys, yc = [], [], []
    for i in range(n):
        sc = scenes.sample_scene(random.Random(f"{seed}-{i}"))
        img, reg = scenes.render(sc)
        rw, rh = geom["resized"]
        left, top = geom["offset"]
        a = np.asarray(img.resize((rw, rh), Image.BICUBIC).crop((left, top, left + S, top + S)),
                       dtype=np.float32) / 255
        ar = scenes.patch_areas(reg, len(sc.objects) + 1, geom, (g, g)).reshape(g * g, -1)
        for p in range(g * g):
            j = int(np.argmax(ar[p]))
            if j == 0 or ar[p, j] < THR:
                continue
            o = sc.objects[j - 1]
            gy, gx = divmod(p, g)
            X.append(a[gy * P:(gy + 1) * P, gx * P:(gx + 1) * P].reshape(-1))
            ys.append(scenes.SHAPES.index(o.shape))
            yc.append(list(scenes.COLOURS).index(o.colour))
    return torch.tensor(np.array(X)), torch.tensor(ys), torch.tensor(yc)


tr, te = data("probe-tr", 3000), data("probe-te", 500)
mu, sd = tr[0].mean(0), tr[0].std(0) + 1e-3


def fit(y_tr, y_te):
    torch.manual_seed(0)
    m = torch.nn.Sequential(torch.nn.Linear(tr[0].shape[1], 512), torch.nn.GELU(),
                            torch.nn.Linear(512, 256), torch.nn.GELU(), torch.nn.Linear(256, 12))
    opt = torch.optim.AdamW(m.parameters(), 1e-3, weight_decay=0.05)
    Xtr, Xte = (tr[0] - mu) / sd, (te[0] - mu) / sd
    for _ in range(40):
        perm = torch.randperm(len(Xtr))
        for k in range(0, len(Xtr), 256):
            b = perm[k:k + 256]
            loss = torch.nn.functional.cross_entropy(m(Xtr[b]), y_tr[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return round(float((m(Xte).argmax(1) == y_te).float().mean()), 3)


maj = np.bincount(te[1].numpy()).max() / len(te[1])
print(json.dumps({"S": S, "P": P, "thr": THR, "patches": [len(tr[1]), len(te[1])],
                  "shape_majority": round(float(maj), 3), "shape": fit(tr[1], te[1]),
                  "colour": fit(tr[2], te[2])}))
