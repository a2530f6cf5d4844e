"""Text only: does the world's LM answer a scene's questions from its caption in context?

Arguments: training world, held-out world (an evidence run's ``work/world-train`` and
``work/world-test``), output folder, LM steps, 1 to train on scene documents
(``LMSpec.scene_documents``) or 0. Trains the LM (``world.models.train_lm``), then asks the
first 150 held-out scenes' questions after their caption and the earlier questions with their
answers, greedy, and prints the accuracy per question type."""

import collections
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from wordlist import load_wordlist
from world import scenes
from world.models import LMSpec, train_lm

train, test, out = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
spec = LMSpec(steps=int(sys.argv[4]), scene_documents=sys.argv[5] == "1")
t = time.time()
path, info = train_lm(scenes.world_text(train, spec.scene_documents), list(load_wordlist().words),
                      out, spec)
print("trained", round(time.time() - t), info["log"][-1])
tok = AutoTokenizer.from_pretrained(path)
m = AutoModelForCausalLM.from_pretrained(path).eval()
caps = {c["image"]: c["conversations"][1]["value"] for c in json.loads((test / "captions.json").read_text())}
types = {(q["image"], q["question"]): q["type"]
         for q in map(json.loads, (test / "questions.jsonl").read_text().splitlines())}
acc = collections.Counter()
with torch.inference_mode():
    for it in json.loads((test / "instruct.json").read_text())[:150]:
        conv, ctx = it["conversations"], caps[it["image"]]
        for h, g in zip(conv[0::2], conv[1::2]):
            q = h["value"].replace("<image>\n", "")
            ids = tok(ctx + " " + q, add_special_tokens=False, return_tensors="pt")["input_ids"]
            ids = torch.cat([torch.tensor([[tok.bos_token_id]]), ids], 1)
            gen = m.generate(ids, max_new_tokens=2, do_sample=False, pad_token_id=tok.pad_token_id)
            ans = tok.decode(gen[0, ids.shape[1]:], skip_special_tokens=True).strip().split(" ")[0]
            ty = types[(it["image"], q)]
            acc[ty + "_n"] += 1
            acc[ty] += ans == g["value"]
            ctx += f" {q} {g['value']}"
print({k: round(acc[k] / acc[k + "_n"], 3) for k in scenes.QUESTION_TYPES if acc[k + "_n"]})
