"""Train one world CLIP variant on the full evidence world and print its zero-shot accuracy.

python docs/experiments/world-clip-shapes/train_clip.py WORK OUT STEPS [key=value ...]
  WORK: an evidence work folder (world-train/, world-test/ are made there if missing)
  key=value: ClipSpec fields, e.g. image_size=96 (shape_negatives=true and shape_loss=1.0 need
  the patches beside this file applied first: they are not in the library, they did not work)
"""

import json
import sys
import time
from dataclasses import replace

from world.evidence import PRESETS, Evidence
from world.models import ClipSpec, train_clip, zero_shot

work, out, steps = sys.argv[1], sys.argv[2], int(sys.argv[3])
kw = {k: json.loads(v) for k, v in (a.split("=", 1) for a in sys.argv[4:])}
spec = ClipSpec(steps=steps, **kw)
e = Evidence(replace(PRESETS["full"], clip=spec), work, progress=False)
e.worlds()
t = time.time()
clip, info = train_clip(e.train_dir, out, spec)
print(
    json.dumps(
        {
            "spec": kw,
            "steps": steps,
            "seconds": round(time.time() - t),
            "final_loss": info["log"][-1]["loss"],
            "zero_shot": zero_shot(clip, e.test_dir),
        }
    )
)
