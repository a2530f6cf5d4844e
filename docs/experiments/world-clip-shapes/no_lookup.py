"""What colour questions score without the lookup, and the majority answer per type.

Argument: an evidence work folder (``EV/work``). Prints, over the held-out colour questions,
the expected score of a guess among the scene's colours and of the biggest object's colour,
and the majority answer of what stage 2 saw (``world.metrics.majority_baseline``)."""

import json
import sys
from pathlib import Path

import numpy as np

from world import metrics, scenes

work = Path(sys.argv[1])


def questions(name):
    return [json.loads(x) for x in (work / name / "questions.jsonl").read_text().splitlines() if x]


truth = scenes.read_truth(work / "world-test" / "ground_truth.jsonl")
colour = [q for q in questions("world-test") if q["type"] == "color"]
guess = np.mean([1 / len({o["colour"] for o in truth[q["image"]]["objects"]}) for q in colour])
biggest = np.mean([max(truth[q["image"]]["objects"], key=lambda o: o["r"])["colour"] == q["answer"]
                   for q in colour])
seen = {it["image"] for it in json.loads((work / "world-train" / "instruct-mllm.json").read_text())}
majority = metrics.majority_baseline([q for q in questions("world-train") if q["image"] in seen],
                                     questions("world-test"))
print(json.dumps({"colour_questions": len(colour), "guess_among_scene_colours": round(float(guess), 3),
                  "biggest_object_colour": round(float(biggest), 3),
                  "majority": {k: round(v["accuracy"] if isinstance(v, dict) else v, 3)
                               for k, v in majority.items()}}))
