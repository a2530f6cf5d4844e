"""The ground-truth world: scenes whose per-patch truth matches the pixels the encoder sees,
and ``make evidence QUICK=1`` end to end, its figures recomputed by an independent reader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from world import scenes

MEAN = torch.tensor([0.48145466, 0.4578275, 0.40821073])[:, None, None]
STD = torch.tensor([0.26862954, 0.26130258, 0.27577711])[:, None, None]


def test_vocabulary_is_2of12():
    from wordlist import load_wordlist

    words = set(load_wordlist().words)
    assert len(scenes.VOCAB) == len(set(scenes.VOCAB)) == 28
    assert set(scenes.VOCAB) <= words


def test_truth_agrees_with_the_pixels_the_encoder_sees(tiny_clip, tmp_path):
    """Through the encoder's own resize and crop: a patch the truth says one plain object
    covers has that object's colour; a background-only patch has no object colour."""
    from PIL import Image

    from pipeline.encoders import load_encoder

    enc = load_encoder(tiny_clip)
    scenes.make_world(tmp_path, 40, seed=3, image_size=enc.image_size[0], grid=enc.grid)
    truth = scenes.read_truth(tmp_path / "ground_truth.jsonl")
    gh, gw = enc.grid
    s = enc.image_size[0] // gw
    checked = 0
    for rec in truth.values():
        px = (enc.preprocess(Image.open(tmp_path / "images" / rec["image"])) * STD + MEAN) * 255
        areas = np.array(rec["areas"])
        for p in range(gh * gw):
            k = int(areas[p].argmax())
            if k == 0 or areas[p, k] < 0.97:
                continue
            obj = rec["objects"][k - 1]
            if obj["pattern"] != "plain":
                continue
            r, c = divmod(p, gw)
            mean = px[:, r * s:(r + 1) * s, c * s:(c + 1) * s].reshape(3, -1).mean(1)
            assert (mean - torch.tensor(scenes.COLOURS[obj["colour"]], dtype=torch.float)).abs().max() < 25
            assert obj["colour"] in rec["true_words"][p] and obj["shape"] in rec["true_words"][p]
            share = {}  # the dominant word covers the largest share (summed over its regions)
            for reg, a in zip(rec["regions"], areas[p], strict=True):
                for w in reg:
                    share[w] = share.get(w, 0) + a
            assert share[rec["dominant"][p]] == pytest.approx(max(share.values()), abs=1e-3)
            checked += 1
    assert checked > 30


def test_crop_geometry_matches_torchvision():
    from PIL import Image
    from torchvision import transforms as T

    for w, h, size in ((128, 96, 64), (97, 130, 64), (300, 200, 336)):
        g = scenes.crop_geometry(w, h, size)
        img = Image.fromarray(np.arange(w * h, dtype=np.int32).reshape(h, w) % 251, mode="I").convert("L")
        ref = T.CenterCrop(size)(T.Resize(size, interpolation=T.InterpolationMode.NEAREST)(img))
        rw, rh = g["resized"]
        left, top = g["offset"]
        ours = img.resize((rw, rh), Image.NEAREST).crop((left, top, left + size, top + size))
        assert np.array_equal(np.asarray(ref), np.asarray(ours)), (w, h, size)


def test_world_is_deterministic_and_its_text_is_true(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        scenes.make_world(d, 12, seed=7, image_size=64, grid=(8, 8))
    assert (a / "ground_truth.jsonl").read_text() == (b / "ground_truth.jsonl").read_text()
    truth = scenes.read_truth(a / "ground_truth.jsonl")
    for rec in truth.values():
        assert (a / "images" / rec["image"]).read_bytes() == (b / "images" / rec["image"]).read_bytes()
        assert len(rec["true_words"]) == 64 and all(set(t) <= set(scenes.VOCAB) for t in rec["true_words"])
    caps = {c["image"]: c["conversations"][1]["value"] for c in json.loads((a / "captions.json").read_text())}
    for img, cap in caps.items():
        rec = truth[img]
        assert rec["regions"][0][0] in cap
        for o in rec["objects"]:
            assert o["colour"] in cap and o["shape"] in cap
    qs = [json.loads(x) for x in (a / "questions.jsonl").read_text().splitlines()]
    for img, rec in truth.items():  # every object its pattern names is asked about, once
        pats = [o["pattern"] for o in rec["objects"]]
        asked = sorted(q["question"] for q in qs if q["image"] == img and q["type"] == "color")
        assert asked == sorted(f"What color is the {p} object?" for p in pats if pats.count(p) == 1)
        exists = [q["question"] for q in qs if q["image"] == img and q["type"] == "exists"]
        assert len(exists) == len(set(exists)) == 2
    for q in qs:
        objs = truth[q["image"]]["objects"]
        if q["type"] == "count":
            shape = q["question"].split()[2][:-1]
            assert scenes.NUMBERS.index(q["answer"]) == sum(o["shape"] == shape for o in objs)
        if q["type"] == "exists":
            colour = q["question"].split()[3]
            assert (q["answer"] == "yes") == any(o["colour"] == colour for o in objs)
        if q["type"] == "color":  # names its object by what one patch carries: the pattern
            pattern = q["question"].split()[4]
            assert q["question"] == f"What color is the {pattern} object?"
            (only,) = [o for o in objs if o["pattern"] == pattern]
            assert q["answer"] == only["colour"]


def test_scene_documents_put_each_caption_before_its_own_answers(tmp_path):
    """``world_text(documents=True)``: the sentences, plus one text per scene that opens with
    its caption and holds each of its questions followed by its answer."""
    scenes.make_world(tmp_path, 5, seed=3, image_size=64, grid=(8, 8))
    plain, docs = scenes.world_text(tmp_path), scenes.world_text(tmp_path, documents=True)
    assert docs[:len(plain)] == plain and len(docs) == len(plain) + 5
    caps = {c["image"]: c["conversations"][1]["value"]
            for c in json.loads((tmp_path / "captions.json").read_text())}
    for doc, it in zip(docs[len(plain):], json.loads((tmp_path / "instruct.json").read_text()), strict=True):
        assert doc.startswith(caps[it["image"]] + " ")
        rest = doc[len(caps[it["image"]]) + 1:]
        conv = it["conversations"]
        assert rest == " ".join(f"{h['value'].replace('<image>' + chr(10), '')} {g['value']}"
                                for h, g in zip(conv[0::2], conv[1::2]))


def test_image_stats_hand_computed():
    from world.metrics import STATS, image_stats

    words = ("red", "circle", "grass", "blue", "sky")
    truth = {"true_words": [["red", "circle"], ["grass"], ["sky"]],
             "dominant": ["circle", "grass", "sky"]}
    S = 65535
    ids = np.array([[0, 3, S], [3, 4, S], [S, S, S]])  # red+blue | blue+sky | nothing
    s = dict(zip(STATS, image_stats(ids, truth, words), strict=True))
    assert s["labelled"] == 2 and s["top1_hits"] == 1  # 'red' true, 'blue' not
    assert s["kept"] == 4 and s["kept_true"] == 1
    assert s["patches"] == 3 and s["dom_hits"] == 0 and s["no_label"] == 1
    assert s["chance_top1"] == pytest.approx(2 / 5 + 1 / 5)


# --- make evidence QUICK=1 ----------------------------------------------------------------------

@pytest.fixture(scope="session")
def quick_evidence(tmp_path_factory):
    from world.__main__ import main

    out = tmp_path_factory.mktemp("evidence")
    rc = main(["evidence", "--quick", "--out", str(out / "ev"), "--md", str(out / "EVIDENCE.md"),
               "--cache", str(out / "cache")])
    assert rc == 0
    return out


@pytest.mark.slow
def test_quick_evidence_writes_everything(quick_evidence):
    from PIL import Image

    res = json.loads((quick_evidence / "ev" / "results.json").read_text())
    md = (quick_evidence / "EVIDENCE.md").read_text()
    for name in ("precision", "alignment_curve", "answers", "scene"):
        with Image.open(quick_evidence / "ev" / f"{name}.png") as im:
            assert im.size[0] > 400 and im.size[1] > 300
        assert f"ev/{name}.png" in md
    assert Path(res["world"]["ground_truth"]).is_file()
    assert set(res["label_precision"]) == {"sea", "vanilla", "surgery-token", "surgery-cls"}
    # one stage-1 + stage-2 run per arm and seed, each with its figures
    arms = {r["arm"] for r in res["runs"]}
    assert "lambda=0" in arms and any(a.startswith("lambda=1") for a in arms)
    assert len(res["runs"]) == len(arms) * len(res["protocol"]["seeds"])
    # stage 2 for lambda = 0 and lambda = 1 at the first temperature on the best labels of the
    # world's words, each patch's top-1 label (stage2_arms="primary"; the quick preset has no
    # secondary arm)
    primary = {"lambda=0", f"lambda=1 sampled, {res['best_mode']} labels (world list, top 1), tau0=0.07"}
    assert {r["arm"] for r in res["runs"] if "answers" in r} == primary == {r["arm"] for r in res["runs"]}
    for r in res["runs"]:
        assert 0 <= r["answers"]["all"]["accuracy"] <= 1 and r["stage2_steps"] > 0
        # the treatment measure on the lambda = 1 arm's labels, for both arms, same pairs
        (key, la), = r["heldout_align"].items()
        assert key == f"{res['best_mode']}/world/top1" and la["tau"] == 0.07 and la["batches"] > 0
        assert 0 < la["chance"] < np.log(28) + 1e-9 and np.isfinite(la["loss"])
        assert set(r["answers_from_tokens"]) == set(res["answer_chance"])  # endpoint (b), per type
        t = r["alignment_truth"]
        assert 0 < t["hub_share"] <= 1 and 1 <= t["nearest_words"] <= 28
        assert t["chance_balanced"] > 0 and 0 <= t["truth_match_balanced"] <= 1
    assert set(res["lm"]["reads_context"]) == {"caption", "none"}
    for r in res["runs"]:
        assert 0 <= r["alignment_truth"]["truth_match_world"] <= 1
        assert np.isfinite(r["caption_loss"])
        # the trainer's verdict on L_a reaches the results (the demo says it in words)
        assert isinstance(r["align_at_chance"], bool) and (r["weight"] > 0 or not r["align_at_chance"])
    assert res["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # picked by itself
    assert res["total_seconds"] > 0  # recorded; how long it takes is the bench's and report's business
    # both formats, a learning curve; blind controls on the baseline
    for r in (r for r in res["runs"] if r["arm"] in primary):
        assert {"answers", "answers_alone", "stage2_curve"} <= set(r)
        assert [c["step"] for c in r["stage2_curve"]][0] == 0 and len(r["stage2_curve"]) >= 3
        assert ("blind" in r) == (r["weight"] == 0)
    summ = res["summary"]
    assert set(summ) >= {"baseline_final", "blind_final", "majority", "seeds", "sea_effect",
                         "total_seconds", "protocol_sha256", "protocol_version", "arms", "primary"}
    assert summ["protocol_version"] == 3
    (arm,) = summ["arms"]
    assert arm["arm"] in primary and isinstance(arm["trained"], bool)
    assert arm["criterion"]["seeds"] == 1 and arm["criterion"]["tau"] == 0.07
    ends = {e["endpoint"] for e in summ["primary"]}
    assert {"truth_match_balanced", "answers_from_tokens.all", "curve_area.all", "curve_area.color"} <= ends
    assert all({"endpoint", "arm", "mean_diff", "ci_low", "ci_high"} <= set(e) for e in summ["primary"])
    roles = {e["endpoint"]: e["role"] for e in summ["primary"]}
    assert roles["truth_match_balanced"] == "primary" and roles["answers_from_tokens.all"].startswith("secondary")
    assert set(summ["baseline_final"]) == set(summ["majority"]) and "all" in summ["majority"]
    assert all({"arm", "metric", "mean_diff", "ci_low", "ci_high"} <= set(e) for e in summ["sea_effect"])
    assert "Can this comparison tell?" in md and "Did SEA's objective train?" in md
    assert "Does the main LM answer from its context?" in md


@pytest.mark.slow
def test_quick_evidence_clip_beats_chance(quick_evidence):
    """Even after a minute of training, the world's CLIP knows the background better than
    chance on held-out scenes, and the best labelling mode beats chance on the world's words."""
    res = json.loads((quick_evidence / "ev" / "results.json").read_text())
    bg = res["clip"]["zero_shot"]["background"]
    assert bg["accuracy"] > bg["chance"] + 0.3
    best = res["label_precision"][res["best_mode"]]["world"]
    assert best["top1_precision"]["value"] > 3 * best["chance_top1_precision"]["value"]


@pytest.mark.slow
def test_quick_evidence_metrics_recomputed_independently(quick_evidence):
    """Re-read every test shard with polars and the word-list file with plain Python, score it
    against ground_truth.jsonl with a loop written from the README's definitions: the
    reported figures must come out exactly."""
    import polars as pl

    res = json.loads((quick_evidence / "ev" / "results.json").read_text())
    work = quick_evidence / "ev" / "work"
    truth = {}
    for line in Path(res["world"]["ground_truth"]).read_text().splitlines():
        r = json.loads(line)
        truth[r["image"]] = r
    full, seen = [], set()  # the README's rule: strip, skip blanks, drop repeats, file order
    for w in (Path(__file__).parents[1] / "wordlist" / "data" / "2of12.txt").read_text().splitlines():
        if w.strip() and w.strip() not in seen:
            seen.add(w.strip())
            full.append(w.strip())
    lists = {"full": full, "world": (work / "vocab.txt").read_text().split()}
    for mode, per_list in res["label_precision"].items():
        for lst, reported in per_list.items():
            words = lists[lst]
            df = pl.read_parquet(sorted((work / "shards" / f"test-{mode}-{lst}").glob("shard-*.parquet")))
            top1 = labelled = kept_n = kept_true = dom = patches = empty = 0
            for path, ids in zip(df["path"].to_list(), df["label_ids"].to_list(), strict=True):
                rec = truth[path]
                n = len(ids) // len(rec["true_words"])
                for p, true in enumerate(rec["true_words"]):
                    kept = [words[i] for i in ids[p * n:(p + 1) * n] if i != 65535]
                    patches += 1
                    if not kept:
                        empty += 1
                        continue
                    labelled += 1
                    top1 += kept[0] in true
                    kept_n += len(kept)
                    kept_true += sum(k in true for k in kept)
                    dom += rec["dominant"][p] in kept
            assert reported["images"] == len(df) == len(truth)
            assert reported["top1_precision"]["value"] == pytest.approx(top1 / labelled, abs=1e-12)
            assert reported["precision_at_n"]["value"] == pytest.approx(kept_true / kept_n, abs=1e-12)
            assert reported["dominant_recall"]["value"] == pytest.approx(dom / patches, abs=1e-12)
            assert reported["no_label_share"]["value"] == pytest.approx(empty / patches, abs=1e-12)
            lo, hi = reported["top1_precision"]["ci95"]
            assert lo <= top1 / labelled <= hi


def test_questions_come_in_an_order_of_their_own_per_scene(tmp_path):
    from world.scenes import make_world

    make_world(tmp_path, 40, 0, 64, (8, 8))
    items = json.loads((tmp_path / "instruct.json").read_text())
    types = {(q["image"], q["question"]): q["type"] for q in
             map(json.loads, (tmp_path / "questions.jsonl").read_text().splitlines())}
    first = {types[(it["image"], it["conversations"][0]["value"].replace("<image>\n", ""))] for it in items}
    assert len(first) >= 3  # not always the background first
    for it in items:  # the image always in the first turn, and only there
        assert it["conversations"][0]["value"].startswith("<image>\n")
        assert not any("<image>" in t["value"] for t in it["conversations"][1:])


def test_conversation_prompts_are_the_training_prefix(tmp_path, tiny_llm):
    """The training-format evaluation asks each question with exactly the ids stage 2 trained
    on before that answer (built independently by the trainer's own sample builder)."""
    from transformers import AutoTokenizer

    from trainer.prompts import _render, _tokens, _with_bos, build_sample
    from world.metrics import conversation_turns
    from world.scenes import make_world

    make_world(tmp_path, 6, 0, 64, (8, 8))
    tok = AutoTokenizer.from_pretrained(tiny_llm)
    items = {it["image"]: it for it in json.loads((tmp_path / "instruct.json").read_text())}
    turns = conversation_turns(tmp_path)
    assert len(turns) == sum(len(it["conversations"]) // 2 for it in items.values())
    for t in turns:
        ids, labels = build_sample(items[t["image"]], tok, "chat", True)
        text = _render(tok, t["messages"], add_generation_prompt=True)
        prompt, _ = _tokens(tok, text)
        _with_bos(tok, text, prompt)
        assert ids[:len(prompt)].tolist() == prompt
        # what follows the prompt in training is this turn's answer, supervised, then the end
        nxt = labels[len(prompt):].tolist()
        end = nxt.index(tok.eos_token_id)
        assert -100 not in nxt[:end + 1] and tok.decode(nxt[:end]).strip() == t["answer"]


@pytest.mark.slow
def test_batched_answers_equal_generate(quick_evidence):
    """The evaluation's batched greedy decoding gives the answers ``trainer generate`` gives."""
    from trainer.final import load_final
    from trainer.generate import answer
    from world.metrics import greedy_answers

    work = quick_evidence / "ev" / "work"
    s2 = sorted((work / "runs").glob("s2-*"))[0]
    mllm, tok, pre, meta = load_final(s2)
    rows = [json.loads(x) for x in (work / "world-test" / "questions.jsonl").read_text().splitlines()[:6]]
    batched = greedy_answers(mllm, tok, pre, work / "world-test", rows, max_new_tokens=4)
    one = [answer(mllm, tok, pre, meta, str(work / "world-test" / "images" / r["image"]), r["question"],
                  max_new_tokens=4) for r in rows]
    assert batched == one


@pytest.mark.slow
def test_world_metrics_follow_the_model_dtype(quick_evidence):
    """The world's measures get visual tokens whatever the tower's dtype (``visual_tokens``
    takes the pixels to it; bf16 on a GPU): the same model cast to bf16 answers, captions and
    aligns without a dtype error."""
    import torch

    from trainer.final import load_final
    from trainer.sea_loss import tokenize_words
    from wordlist import load_wordlist
    from world.metrics import alignment_truth, caption_loss, greedy_answers

    work = quick_evidence / "ev" / "work"
    mllm, tok, pre, _ = load_final(sorted((work / "runs").glob("s2-*"))[0])
    mllm.to(torch.bfloat16)
    test = work / "world-test"
    rows = [json.loads(x) for x in (test / "questions.jsonl").read_text().splitlines()[:4]]
    assert len(greedy_answers(mllm, tok, pre, test, rows, max_new_tokens=2)) == 4
    assert caption_loss(mllm, tok, pre, test, batch=8) > 0
    words = load_wordlist().words
    wt = tokenize_words(tok, words)
    assert 0 <= alignment_truth(mllm, wt, words, test, pre, scenes.VOCAB)["truth_match_world"] <= 1


def test_world_device_is_picked_and_keys_its_models(tmp_path):
    """``auto`` is the CPU here; asking for CUDA without one is refused by name; a model's
    cache key is today's on the CPU and another one on CUDA."""
    import torch

    from seacore.device import DeviceUnavailable
    from world.evidence import PRESETS, Evidence
    from world.models import ClipSpec, spec_key

    def device(name):
        return Evidence(PRESETS["quick"], tmp_path, progress=False, device=name).device

    assert device("auto") == ("cuda" if torch.cuda.is_available() else "cpu")
    assert device("cpu") == "cpu"
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="--device=cuda, but this machine has no usable CUDA"):
            device("cuda")
    spec = ClipSpec()
    assert spec_key(spec, "w") == spec_key(spec, "w", "cpu") != spec_key(spec, "w", "cuda")
    assert spec_key(spec, "w", "cuda") == spec_key(spec, "w", "cuda:0")


def test_paired_intervals_against_a_hand_computation():
    """The 95 % t interval of paired differences, against numbers worked by hand; one seed gives
    a mean and no interval (never NaN in results.json)."""
    from world.summary import curve_area, mean_ci

    ci = mean_ci([0.1, 0.3, 0.2, 0.4, 0.0])  # mean 0.2, sd 0.1581, t(4) 2.776 -> +-0.1963
    assert ci["mean"] == pytest.approx(0.2) and ci["ci_low"] == pytest.approx(0.2 - 0.19630, abs=1e-4)
    assert mean_ci([0.5]) == {"mean": 0.5, "ci_low": None, "ci_high": None, "n": 1}
    # area under accuracy over the stage's progress: trapezoids on 0 .. 1
    curve = [{"step": 0, "all": 0.0}, {"step": 50, "all": 0.5}, {"step": 100, "all": 0.5}]
    assert curve_area(curve) == pytest.approx(0.125 + 0.25)


@pytest.mark.slow  # the quick evidence it reads trains the world's models (a minute)
def test_demo_summary_says_what_it_found(quick_evidence, capsys, tmp_path):
    """The demo's printout, on a real (quick) evidence run's results: one sentence per section,
    the chance warning explained exactly when the lambda = 1 arm's L_a sat at chance."""
    from world.demo import print_summary

    res = json.loads((quick_evidence / "ev" / "results.json").read_text())
    key = next(iter(res["runs"][0]["heldout_align"]))
    for at_chance in (True, False):
        for r in res["runs"]:
            r["heldout_align"][key]["loss"] = 1.0 if r["weight"] > 0 else 2.0
            if r["weight"] > 0:
                r["align_at_chance"] = at_chance
        print_summary(res, tmp_path)
        out = capsys.readouterr().out
        assert out.count("In words:") == 3 and "label runs" in out.splitlines()[-1]
        assert ("stayed at its chance level" in out) == at_chance
        assert ("SEA's objective trained (held-out L_a 1.00 below" in out) == (not at_chance)
        assert ("did not train in this run" in out) == at_chance


def test_clip_shape_groups_differ_only_in_shapes(tmp_path):
    """A shape-group batch: scenes in groups that share everything but their objects' shapes,
    each with another tuple of shapes, so only shape tells a group's captions apart."""
    from dataclasses import replace

    from world.models import ClipSpec, shape_groups, train_clip

    spec = ClipSpec(batch_size=32, shape_group=4)
    batch = shape_groups(spec, step=3)
    assert len(batch) == 32 and batch == shape_groups(spec, step=3)
    assert batch != shape_groups(spec, step=4)
    groups = [batch[i:i + 4] for i in range(0, 32, 4)]
    assert len({g[0].background for g in groups}) > 1
    for g in groups:
        first = g[0]
        for sc in g:
            assert (sc.background, sc.texture_seed) == (first.background, first.texture_seed)
            assert [replace(o, shape="") for o in sc.objects] == [replace(o, shape="") for o in first.objects]
        assert len({tuple(o.shape for o in sc.objects) for sc in g}) == 4
    # and the CLIP trains on such batches (two steps on a tiny world)
    scenes.make_world(tmp_path / "w", 8, seed=0, image_size=64, grid=(8, 8))
    spec_str, info = train_clip(tmp_path / "w", tmp_path / "clip", replace(spec, steps=2, batch_size=8))
    assert (tmp_path / "clip" / "open_clip_model.safetensors").is_file() and len(info["log"]) == 2
    assert info["train_images"] == 16  # two steps of two groups of four, counted as drawn


def test_killed_evidence_keeps_its_finished_runs(tmp_path, monkeypatch):
    """A run written after each arm and seed: killed at the third run, the next evidence run
    trains only the runs the first did not finish."""
    from dataclasses import replace

    from world.evidence import PRESETS, Evidence

    (tmp_path / "clip").mkdir()
    (tmp_path / "clip" / "open_clip_model.safetensors").write_bytes(b"weights")
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "ground_truth.jsonl").write_text("{}\n")
    arms = [{"name": "a", "weight": 0.0}, {"name": "b", "weight": 1.0}]
    calls, kill_at = [], [3]

    class Killed(Exception):
        pass

    def one_run(arm, seed):
        calls.append((arm["name"], seed))
        if len(calls) == kill_at[0]:
            raise Killed
        d = tmp_path / f"run-{arm['name']}-{seed}"
        d.mkdir(exist_ok=True)
        return {"arm": arm["name"], "seed": seed, "weight": arm["weight"], "stage1_dir": str(d)}

    def evidence():
        ev = Evidence(replace(PRESETS["quick"], stage2=False, seeds=(0, 1)), tmp_path / "out",
                      progress=False)
        ev.clip, ev.train_dir = f"local-dir:{tmp_path / 'clip'}", tmp_path / "train"
        monkeypatch.setattr(ev, "arms", lambda: arms)
        monkeypatch.setattr(ev, "_one_run", one_run)
        return ev

    (tmp_path / "out").mkdir()
    with pytest.raises(Killed):
        evidence().sea_effect()
    assert calls == [("a", 0), ("a", 1), ("b", 0)]
    calls.clear()
    kill_at[0] = None
    ev = evidence()
    ev.sea_effect()
    assert calls == [("b", 0), ("b", 1)]
    assert ev.results["reused_runs"] == 2
    assert [(r["arm"], r["seed"]) for r in ev.results["runs"]] == [("a", 0), ("a", 1), ("b", 0), ("b", 1)]


@pytest.mark.slow
def test_baseline_command_sizes_a_protocol(quick_evidence, tmp_path, capsys):
    """``python -m world baseline``: the lambda = 0 model alone, its stage-2 curve and blind
    controls, with the quick evidence's cached models; a CLIP setting that is not a ClipSpec
    field is refused by name."""
    from world.__main__ import main

    cache = str(quick_evidence / "cache")
    args = ["baseline", "--preset", "quick", "--cache", cache, "--out", str(tmp_path / "b"),
            "--stage2-epochs", "1", "--curve-points", "1"]
    assert main(args) == 0
    res = json.loads((tmp_path / "b" / "baseline.json").read_text())
    assert res["stage2_steps"] > 0 and [c["step"] for c in res["curve"]] == [0, res["stage2_steps"]]
    assert res["device"] == ("cuda" if torch.cuda.is_available() else "cpu")  # auto
    assert set(res["final"]["blind"]) == {"zero", "swap"}
    assert res["protocol"]["clip"]["steps"] == 60 and "shape" in res["clip_zero_shot"]
    assert not (tmp_path / "b" / "results.json").exists()  # it never runs the comparison
    capsys.readouterr()
    assert res["protocol"]["lm"]["steps"] == 60
    for bad, says in ((["--clip", "no_such_field=1"], "ClipSpec"), (["--clip", "steps"], "FIELD=VALUE"),
                      (["--lm", "no_such_field=1"], "LMSpec"), (["--lm", "steps=abc"], "--lm")):
        with pytest.raises(SystemExit) as e:
            main(args + bad)
        assert says in str(e.value)


def test_a_cached_background_is_never_painted_on():
    """Scenes of a shape group share one cached background; painting one scene's objects must
    leave the next scene's pixels what a fresh render gives."""
    import random
    from dataclasses import replace

    a = scenes.sample_scene(random.Random(3))
    b = replace(a, objects=[replace(o, shape="star" if o.shape != "star" else "circle") for o in a.objects])
    scenes.render(a)
    img, regions = scenes.render(b)
    scenes._background.cache_clear()
    fresh, fresh_regions = scenes.render(b)
    assert np.array_equal(np.asarray(img), np.asarray(fresh)) and np.array_equal(regions, fresh_regions)


def test_primary_arms_go_on_to_stage_2_and_the_rest_stop_after_stage_1(tmp_path):
    """`stage2_arms="primary"`: lambda = 0 and lambda = 1 at the first temperature on the best
    labels of the primary list, for each LM, train stage 2; the other temperature, all top-n
    labels and the full-list labels are measured after stage 1 only. "all" (the default)
    marks none."""
    from dataclasses import replace

    from world.evidence import PRESETS, Evidence
    from world.models import LMSpec

    p = replace(PRESETS["quick"], tau_arms=(1.0, 0.07), all_labels_arm=True, full_list_arm=True,
                lm_small=LMSpec(hidden=64, heads=2), stage2_arms="primary")

    def arms(proto):
        ev = Evidence(proto, tmp_path, device="cpu")
        ev.best = {"world": ("surgery", "cls"), "full": ("surgery", "token")}
        ev.best_mode = ev.best["world"]
        return ev.arms()

    got = {a["name"]: (a.get("stage1_only", False), a["list"], a["top_k"], a["mode"]) for a in arms(p)}
    world, full = ("surgery", "cls"), ("surgery", "token")
    first = "lambda=1 sampled, surgery-cls labels (world list, top 1), tau0=1"
    assert got == {"lambda=0": (False, "world", 1, world), first: (False, "world", 1, world),
                   "lambda=1 sampled, surgery-cls labels (world list, top 1), tau0=0.07": (True, "world", 1, world),
                   "lambda=1 sampled, surgery-cls labels (world list, all top 10), tau0=1": (True, "world", 0, world),
                   "lambda=1 sampled, surgery-token labels (full list, top 10), tau0=1": (True, "full", 0, full),
                   "lambda=0, small LM": (True, "world", 1, world), first + ", small LM": (True, "world", 1, world)}
    assert [a["name"] for a in arms(p) if a["primary"]] == ["lambda=0", first]
    every = arms(replace(p, stage2_arms="all"))
    assert len(every) == 7 and not any("stage1_only" in a for a in every)
    with pytest.raises(ValueError, match="stage2_arms"):
        arms(replace(p, stage2_arms="some"))


def _fake_run(arm: str, lm: str, seed: int, weight: float, truth: float, acc: float | None) -> dict:
    r = {"arm": arm, "lm": lm, "seed": seed, "weight": weight, "caption_loss": 1.0,
         "stage1_seconds": 1.0, "stage1_dir": "/nonexistent",
         "alignment_truth": {"truth_match_world": truth, "truth_match_full": truth}}
    if acc is not None:
        r["answers"] = {"color": {"accuracy": acc}, "all": {"accuracy": acc}}
    return r


def test_comparisons_pair_each_arm_with_lambda_0_of_its_own_lm():
    """Each lambda = 1 arm minus lambda = 0 of the same LM and seed (not the last lambda = 0
    run of that seed, whichever LM it had); an arm stopped after stage 1 has no answers."""
    from world.report import comparisons, summarise
    from world.summary import sea_effect

    runs = []
    for seed in (0, 1):
        runs += [_fake_run("lambda=0", "main", seed, 0, 0.30, 0.50),
                 _fake_run("l1", "main", seed, 1, 0.40 + seed / 100, 0.60),
                 _fake_run("l1 stage 1 only", "main", seed, 1, 0.35, None),
                 _fake_run("lambda=0, small LM", "small", seed, 0, 0.10, 0.20),
                 _fake_run("l1, small LM", "small", seed, 1, 0.15, 0.30)]
    res = {"runs": runs, "answer_chance": {"color": 0.1, "all": 0.1}}
    lines = "\n".join(comparisons(res))
    assert "- l1: truth match (world) +0.105 [+0.100, +0.110]" in lines
    assert "- l1, small LM: truth match (world) +0.050 [+0.050, +0.050]" in lines
    assert "answer accuracy +0.100" in lines.split("- l1, small LM")[1]
    only = next(x for x in lines.splitlines() if x.startswith("- l1 stage 1 only"))
    assert "+0.050" in only and "answer accuracy" not in only
    assert "answers.all" not in summarise(res)["l1 stage 1 only"]
    eff = {(e["arm"], e["metric"]): e["mean_diff"] for e in sea_effect(res)}
    assert eff[("l1, small LM", "answers.all")] == pytest.approx(0.1)
    assert ("l1 stage 1 only", "answers.all") not in eff


def test_the_committed_protocol_is_the_full_preset():
    """`make evidence` reads evidence/protocol-v3.json; `baseline --preset full` and the code's
    defaults read PRESETS["full"]: the two are one protocol. v2's file still loads as v2."""
    from world.evidence import PRESETS, PROTOCOL_FILE, load_protocol

    proto, sha = load_protocol(PROTOCOL_FILE)
    assert PROTOCOL_FILE.name == "protocol-v3.json"
    assert proto == PRESETS["full"] and len(sha) == 64
    assert proto.version == 3 and len(proto.seeds) >= 5 and proto.lm.scene_documents
    assert proto.label_list == "world" and proto.criterion_tau is not None
    v2, _ = load_protocol(PROTOCOL_FILE.with_name("protocol-v2.json"))
    assert (v2.version, v2.label_list, v2.train_top_k, v2.criterion_tau, v2.tau_lr_scale) == (2, "full", 0, None, 1.0)


def _la_run(arm: str, seed: int, weight: float, la: float, fired: bool = False) -> dict:
    r = _fake_run(arm, "main", seed, weight, 0.3, None)
    r.update(heldout_align={"surgery-cls/world/top1": {"loss": la, "chance": 2.0, "tau": 0.07}},
             align_at_chance=fired)
    return r


def test_an_arm_counts_only_when_its_objective_trained():
    """Protocol v3's rule: held-out L_a below lambda = 0's on the same pairs by more than the
    seeds' spread, the chance watcher silent in every seed. An arm that fails enters no
    comparison and no sentence about SEA's effect; its figures are reported."""
    from world.report import comparisons, effect_lines, treatment_lines
    from world.summary import machine_summary, treatment

    runs = []
    for seed, (b, good, noisy, loud) in enumerate([(2.0, 1.0, 1.9, 1.0), (2.1, 1.2, 2.3, 1.1),
                                                   (1.9, 1.1, 1.95, 0.9)]):
        runs += [_la_run("lambda=0", seed, 0, b), _la_run("good", seed, 1, good),
                 _la_run("noisy", seed, 1, noisy), _la_run("loud", seed, 1, loud, fired=seed == 1)]
    res = {"runs": runs, "answer_chance": {"color": 0.1, "all": 0.1},
           "protocol": {"seeds": [0, 1, 2], "version": 3, "criterion_tau": 0.07}}
    got = {a["arm"]: a for a in treatment(res)}
    assert got["good"]["trained"] is True
    assert got["good"]["criterion"]["heldout_align_lambda0_minus_lambda1"] == pytest.approx(0.9)
    # mean +0.017 against an sd of 0.21 over seeds: not delivered
    assert got["noisy"]["trained"] is False and got["noisy"]["criterion"]["sd_over_seeds"] > 0.1
    assert got["loud"]["trained"] is False and got["loud"]["criterion"]["watcher_fired"] == 1
    res["summary"] = machine_summary(res, None)
    assert res["summary"]["protocol_version"] == 3 and len(res["summary"]["arms"]) == 3
    text = "\n".join(comparisons(res) + effect_lines(res))
    assert "- good:" in text and "noisy" not in text and "loud" not in text
    table = "\n".join(treatment_lines(res))
    assert "| noisy | **did not train** |" in table and "| good | **yes** |" in table


def test_balanced_truth_match_is_not_won_by_a_hub(tmp_path):
    """Every visual token at one word's feature (a hub): plain truth match is that word's
    share of patches, the balanced one its share averaged over the dominant words, recomputed
    here from ground_truth.jsonl with plain Python."""
    import torch

    from trainer.sea_loss import WordTokens
    from world.metrics import alignment_truth

    scenes.make_world(tmp_path / "w", 6, seed=0, image_size=64, grid=(8, 8))
    truth = [json.loads(x) for x in (tmp_path / "w" / "ground_truth.jsonl").read_text().splitlines()]
    words = scenes.VOCAB
    hub = max(words, key=lambda w: sum(w in t for r in truth for t in r["true_words"]))
    emb = torch.nn.Embedding(len(words), 16)

    class Hub(torch.nn.Module):
        llm = type("LM", (), {"get_input_embeddings": lambda self: emb})()

        def visual_tokens(self, px):
            return emb.weight[words.index(hub)].expand(px.shape[0], 64, 16)

    wt = WordTokens(torch.arange(len(words)), torch.arange(len(words)))
    got = alignment_truth(Hub(), wt, words, tmp_path / "w", lambda im: torch.zeros(3, 64, 64), words)
    pairs = [(d, hub in t) for r in truth for t, d in zip(r["true_words"], r["dominant"], strict=True)]
    plain = sum(h for _, h in pairs) / len(pairs)
    per = {}
    for d, h in pairs:
        per.setdefault(d, []).append(h)
    balanced = sum(sum(v) / len(v) for v in per.values()) / len(per)
    assert got["truth_match_world"] == pytest.approx(plain) and got["truth_match_balanced"] == pytest.approx(balanced)
    assert got["hub_word"] == hub and got["hub_share"] == 1.0 and got["nearest_words"] == 1
    assert got["truth_match_balanced"] < got["truth_match_world"]  # the hub wins plain, not balanced


@pytest.mark.slow
def test_context_answers_equal_transformers_generate(quick_evidence):
    """The LM's answers after a caption (and the MLLM's after its visual tokens) come from a
    batched, left-padded greedy loop: each equals transformers' own ``generate`` on the same
    prompt, one at a time, cut to the true answer's word count."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from world.metrics import context_answers, questions

    res = json.loads((quick_evidence / "ev" / "results.json").read_text())
    test = Path(res["world"]["ground_truth"]).parent
    lm = next(Path(p) for p in (quick_evidence / "cache").glob("lm-*"))
    tok = AutoTokenizer.from_pretrained(lm)
    llm = AutoModelForCausalLM.from_pretrained(lm).eval()
    rows = questions(test)[:10]
    caps = {c["image"]: c["conversations"][1]["value"] for c in json.loads((test / "captions.json").read_text())}
    got = context_answers(llm, tok, rows, "caption", test)
    for r, g in zip(rows, got, strict=True):
        ids = torch.tensor([[tok.bos_token_id] + tok(caps[r["image"]] + " " + r["question"],
                                                     add_special_tokens=False)["input_ids"]])
        out = llm.generate(ids, max_new_tokens=3, do_sample=False, pad_token_id=tok.pad_token_id,
                           eos_token_id=tok.eos_token_id)
        want = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True).split()
        assert g == " ".join(want[:len(r["answer"].split())])
    assert len(context_answers(llm, tok, rows, "none", test)) == 10
    with pytest.raises(ValueError, match="context"):
        context_answers(llm, tok, rows, "picture", test)
