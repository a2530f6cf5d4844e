"""The lambda = 0 baseline on a world of N scenes (CLIP, LM, stage 1 and stage 2 all on them)
instead of 3,000 / 2,000: does the pattern lookup come with more distinct scenes rather than
more epochs of the same 2,000? Same CLI numbers as `python -m world baseline`.

    python docs/experiments/world-clip-shapes/more_scenes.py OUT N STAGE2_EPOCHS STAGE2_LR
"""

import json
import sys
from dataclasses import replace

from world import evidence
from world.baseline import run_baseline

out, n, epochs, lr = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
evidence.PRESETS["more-scenes"] = replace(evidence.PRESETS["full"], train_scenes=n, mllm_scenes=n,
                                          lm_small=None)
res = run_baseline(out, 1, epochs, lr, 32, curve_points=10, preset="more-scenes")
print(json.dumps({"answers": {t: round(a["accuracy"], 3) for t, a in res["final"]["answers"].items()},
                  "stage2_steps": res["stage2_steps"], "stage2_seconds": res["stage2_seconds"]}))
