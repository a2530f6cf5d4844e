"""What a stage-2 model answers to colour and exists questions, in the training format.

Arguments: a stage-2 ``final`` folder, the held-out world. Prints how many colour answers name
a colour present in the scene, the biggest object's colour, the right one (and in one-object
scenes), and how often exists is answered ``yes``."""

import collections
import sys
from pathlib import Path

from trainer.final import load_final
from world import metrics, scenes

run, test = sys.argv[1], Path(sys.argv[2])
mllm, tok, pre, _ = load_final(run)
mllm.eval()
truth = scenes.read_truth(test / "ground_truth.jsonl")
turns = [t for t in metrics.conversation_turns(test) if t["type"] in ("color", "exists")]
given = metrics.conversation_answers(mllm, tok, pre, test, turns)
c = collections.Counter()
for t, g in zip(turns, given, strict=True):
    objs = truth[t["image"]]["objects"]
    if t["type"] == "color":
        c["colour"] += 1
        c["colour_right"] += g == t["answer"]
        c["colour_present"] += g in {o["colour"] for o in objs}
        c["colour_biggest"] += g == max(objs, key=lambda o: o["r"])["colour"]
        c["one_object"] += len(objs) == 1
        c["one_object_right"] += len(objs) == 1 and g == t["answer"]
    else:
        c["exists"] += 1
        c["exists_right"] += g == t["answer"]
        c["exists_yes"] += g == "yes"
print(dict(c))
