"""Measures against the world's ground truth. Everything here reads only the written label
shards, the ground-truth file and trained models, so another program can recompute it.

Label precision (per patch of the encoder's grid; definitions fixed before any result):
- ``top1_precision``: over patches with at least one kept label, the share whose top-1 word
  is true at that patch. Chance: a uniformly drawn word of the list is true with probability
  |true words at p| / |list|.
- ``precision_at_n``: over all kept labels, the share true at their patch (same chance).
- ``dominant_recall``: over all patches, the share whose dominant word is among the kept
  labels (a patch with none counts as a miss). Chance: kept count / |list|.
- ``no_label_share``: patches with no kept label.
Intervals: 95 % percentile bootstrap over images (1,000 resamples, fixed seed).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from pipeline.shards import SENTINEL, batch_arrays
from world.scenes import read_truth

STATS = ("labelled", "top1_hits", "kept", "kept_true", "patches", "dom_hits", "no_label",
         "chance_top1", "chance_kept", "chance_dom")


def read_labels(shard_dir: str | Path) -> tuple[dict, dict[str, tuple[np.ndarray, np.ndarray]]]:
    """-> (run metadata, {image path: (ids (P, n), scores (P, n))})."""
    from pipeline.data import normalize_path
    from pipeline.shards import iter_shard, open_label_set

    meta, paths = open_label_set(shard_dir)  # verified once (sizes, sha256, metadata)
    out = {}
    for rb in (b for p in paths for b in iter_shard(p)):
        _, ids, scores = batch_arrays(rb, meta["top_n"])
        for path, i, s in zip(rb.column("path").to_pylist(), ids, scores, strict=True):
            out[normalize_path(path)] = (i, s)
    return meta, out


def image_stats(ids: np.ndarray, truth: dict, words: tuple[str, ...]) -> np.ndarray:
    """One image's counts (``STATS`` order) from its label ids (P, n) and its truth record."""
    W = len(words)
    s = np.zeros(len(STATS))
    for row, true, dom in zip(ids, truth["true_words"], truth["dominant"], strict=True):
        kept = [words[i] for i in row if i != SENTINEL]
        tset = set(true)
        s[4] += 1
        s[9] += min(1.0, len(kept) / W)
        if not kept:
            s[6] += 1
            continue
        s[0] += 1
        s[1] += kept[0] in tset
        s[2] += len(kept)
        s[3] += sum(k in tset for k in kept)
        s[5] += dom in kept
        s[7] += len(tset) / W
        s[8] += len(kept) * len(tset) / W
    return s


def _ratios(s: np.ndarray) -> dict:
    """Metric values from summed ``STATS`` (works on (..., len(STATS)) arrays)."""
    def div(a, b):
        return np.divide(a, b, out=np.full(np.shape(a), np.nan), where=np.asarray(b) > 0)

    return {"top1_precision": div(s[..., 1], s[..., 0]),
            "precision_at_n": div(s[..., 3], s[..., 2]),
            "dominant_recall": div(s[..., 5], s[..., 4]),
            "no_label_share": div(s[..., 6], s[..., 4]),
            "chance_top1_precision": div(s[..., 7], s[..., 0]),
            "chance_precision_at_n": div(s[..., 8], s[..., 2]),
            "chance_dominant_recall": div(s[..., 9], s[..., 4])}


def bootstrap(per_image: np.ndarray, reps: int = 1000, seed: int = 0) -> dict:
    """Point values and 95 % intervals of every metric, resampling images."""
    point = {k: float(v) for k, v in _ratios(per_image.sum(0)).items()}
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(per_image), size=(reps, len(per_image)))
    boots = _ratios(per_image[idx].sum(1))
    return {k: {"value": point[k],
                "ci95": [float(np.nanpercentile(boots[k], 2.5)), float(np.nanpercentile(boots[k], 97.5))]}
            for k in point}


def label_precision(shard_dir: str | Path, truth_path: str | Path, words: tuple[str, ...]) -> dict:
    """Label precision of a label run against the ground truth (see the module docstring)."""
    meta, labels = read_labels(shard_dir)
    truth = read_truth(truth_path)
    missing = sorted(set(truth) - set(labels))
    if missing:
        raise ValueError(f"{shard_dir}: no labels for {len(missing)} ground-truth images "
                         f"(first: {missing[0]})")
    per = np.stack([image_stats(labels[k][0], truth[k], words) for k in sorted(truth)])
    out = bootstrap(per)
    out["images"] = len(per)
    out["patches"] = int(per[:, 4].sum())
    out["wordlist_size"] = len(words)
    out["mode"] = meta.get("mode")
    out["surgery_weights"] = meta.get("surgery_weights")
    return out


# --- trained models -----------------------------------------------------------------------------

def pixels_of(root: Path, paths: list[str], preprocess) -> torch.Tensor:
    """A world folder's images (paths under ``root/images``) through the encoder's transform."""
    from PIL import Image

    return torch.stack([preprocess(Image.open(root / "images" / p).convert("RGB")) for p in paths])


@torch.inference_mode()
def alignment_truth(mllm, word_tokens, words: tuple[str, ...], world_dir: str | Path,
                    preprocess, vocab: tuple[str, ...], batch: int = 64) -> dict:
    """Share of visual tokens whose nearest word (cosine to the Eq. 8 label features in the
    LLM's input-embedding space) is true at that patch, over the whole list and over the
    world's vocabulary; chance = mean |true words| / |words searched|.

    Over the world's vocabulary also: ``truth_match_balanced``, the truth match of the patches
    of each dominant word, averaged over the dominant words, so each word weighs the same
    however many patches it covers (plain truth match lets a hub win by frequency: tokens all
    nearest a background word score every patch of that background; balanced, they score only
    in the groups where that word is true; with few patches per group it is noisy), its
    chance level, and ``hub_share``, the share of tokens nearest the most frequent nearest
    word (with ``nearest_words``, how many distinct words are someone's nearest)."""
    from trainer.align_eval import word_table

    root = Path(world_dir)
    truth = read_truth(root / "ground_truth.jsonl")
    table = word_table(mllm, word_tokens)
    vocab_ids = torch.tensor([words.index(w) for w in vocab])
    keys = sorted(truth)
    hits = {"full": 0, "world": 0}
    chance = {"full": 0.0, "world": 0.0}
    by_dom: dict[str, list[float]] = {}  # dominant word -> [hits, patches, chance sum]
    nearest_count: dict[str, int] = {}
    n = 0
    for i in range(0, len(keys), batch):
        chunk = keys[i:i + batch]
        tok = F.normalize(mllm.visual_tokens(pixels_of(root, chunk, preprocess)).float(), dim=-1)
        sims = (tok @ table.T.to(tok.device)).cpu()  # (B, P, W)
        near_full = sims.argmax(-1)
        near_world = vocab_ids[sims[..., vocab_ids].argmax(-1)]
        for b, k in enumerate(chunk):
            for p, (true, dom) in enumerate(zip(truth[k]["true_words"], truth[k]["dominant"], strict=True)):
                t = set(true)
                w = words[int(near_world[b, p])]
                hits["full"] += words[int(near_full[b, p])] in t
                hits["world"] += w in t
                chance["full"] += len(t) / len(words)
                chance["world"] += len(t) / len(vocab)
                g = by_dom.setdefault(dom, [0, 0, 0.0])
                g[0] += w in t
                g[1] += 1
                g[2] += len(t) / len(vocab)
                nearest_count[w] = nearest_count.get(w, 0) + 1
                n += 1
    hub = max(nearest_count, key=nearest_count.get)
    return {"patches": n, "truth_match_full": hits["full"] / n, "truth_match_world": hits["world"] / n,
            "chance_full": chance["full"] / n, "chance_world": chance["world"] / n,
            "truth_match_balanced": float(np.mean([g[0] / g[1] for g in by_dom.values()])),
            "chance_balanced": float(np.mean([g[2] / g[1] for g in by_dom.values()])),
            "dominant_words": len(by_dom), "hub_word": hub, "hub_share": nearest_count[hub] / n,
            "nearest_words": len(nearest_count)}


@torch.inference_mode()
def caption_loss(mllm, tok, preprocess, world_dir: str | Path, batch: int = 32) -> float:
    """Mean caption (next-token) loss per target token on a world's captions, stage-1 format."""
    from trainer.model import splice, supervised_lm_loss
    from trainer.prompts import build_sample

    root = Path(world_dir)
    items = json.loads((root / "captions.json").read_text())
    embed = mllm.llm.get_input_embeddings()
    total, count = 0.0, 0
    for i in range(0, len(items), batch):
        chunk = items[i:i + batch]
        built = [build_sample(it, tok, "plain", True) for it in chunk]
        feats = mllm.visual_tokens(pixels_of(root, [it["image"] for it in chunk], preprocess))
        sp = splice(embed, [b[0] for b in built], [b[1] for b in built], feats,
                    [True] * len(chunk), max_length=4096)
        total += float(supervised_lm_loss(mllm.llm, sp.inputs_embeds, sp.attention_mask,
                                          sp.labels, reduction="sum"))
        count += int((sp.labels[:, 1:] != -100).sum())
    return total / max(1, count)


@torch.inference_mode()
def greedy_answers(mllm, tok, preprocess, world_dir: str | Path, rows: list[dict],
                   max_new_tokens: int = 4, batch: int = 64, image: str = "real") -> list[str]:
    """Greedy answers to ``rows`` (questions.jsonl records) asked alone, as the first turn:
    each prompt is built as ``trainer.generate.answer`` builds it. ``image``: ``real``, or a
    blind control (``zero``: the pixels zeroed; ``swap``: another scene's image)."""
    from trainer.prompts import generation_prompt

    ids = [generation_prompt(tok, r["question"], "chat", True) for r in rows]
    return _decode(mllm, tok, preprocess, Path(world_dir), ids, [r["image"] for r in rows],
                   max_new_tokens, batch, image)


def conversation_turns(world_dir: str | Path) -> list[dict]:
    """Every question of a world's conversations (``instruct.json``) in the format stage 2
    trained on: the turns before it, with their true answers, then the question. One record
    per question: ``image``, ``type``, ``answer``, ``messages`` (the prompt's turns), ``turn``."""
    root = Path(world_dir)
    types = {(q["image"], q["question"]): q["type"] for q in questions(root)}
    out = []
    for it in json.loads((root / "instruct.json").read_text()):
        conv = it["conversations"]
        msgs = []
        for j in range(0, len(conv), 2):
            q, a = conv[j]["value"], conv[j + 1]["value"]
            msgs.append({"role": "user", "content": q})
            out.append({"image": it["image"], "answer": a, "turn": j // 2, "messages": list(msgs),
                        "type": types[(it["image"], q.replace("<image>\n", ""))]})
            msgs.append({"role": "assistant", "content": a})
    return out


@torch.inference_mode()
def conversation_answers(mllm, tok, preprocess, world_dir: str | Path, turns: list[dict],
                         max_new_tokens: int = 4, batch: int = 64, image: str = "real") -> list[str]:
    """Greedy answers to ``conversation_turns`` records: the prompt is the conversation so far
    rendered with the chat template exactly as training renders it, image in the first turn."""
    from trainer.prompts import conversation_prompt

    ids = [torch.tensor(conversation_prompt(tok, t["messages"]), dtype=torch.long) for t in turns]
    return _decode(mllm, tok, preprocess, Path(world_dir), ids, [t["image"] for t in turns],
                   max_new_tokens, batch, image)


def questions(world_dir: str | Path) -> list[dict]:
    """A world's ``questions.jsonl``: one record per question (image, type, question, answer)."""
    text = (Path(world_dir) / "questions.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line]


@torch.inference_mode()
def context_answers(llm, tok, rows: list[dict], context: str, world_dir: str | Path | None = None,
                    mllm=None, preprocess=None, max_new_tokens: int = 3, batch: int = 64) -> list[str]:
    """Each question of ``rows`` asked right after a context, in the form of the LM's scene
    documents (``scenes.world_text``: the caption, then questions each followed by its
    answer); greedy, the answer read as the first words of the reply (as many as the true
    answer has: a document's answer runs on into its next question). ``context``:
    ``caption`` (the scene's caption as text: does the LM answer from what it reads),
    ``none`` (the question alone: what it knows without looking, the majority level) or
    ``image`` (``mllm``'s visual tokens where the caption stood, the LM frozen: SEA's premise
    that an LLM reads aligned visual tokens as the words they align with)."""
    from trainer.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, splice

    if context not in ("caption", "none", "image"):
        raise ValueError(f"context must be caption, none or image, got {context!r}")
    caps = {}
    if context == "caption":
        caps = {c["image"]: c["conversations"][1]["value"]
                for c in json.loads((Path(world_dir) / "captions.json").read_text())}
    bos = [tok.bos_token_id] if tok.bos_token_id is not None else []
    ids = []
    for r in rows:
        if context == "caption":
            ids.append(bos + tok(caps[r["image"]] + " " + r["question"], add_special_tokens=False)["input_ids"])
        elif context == "none":
            ids.append(bos + tok(r["question"], add_special_tokens=False)["input_ids"])
        else:
            ids.append(bos + [IMAGE_TOKEN_INDEX] + tok(" " + r["question"], add_special_tokens=False)["input_ids"])
    ids = [torch.tensor(x, dtype=torch.long) for x in ids]
    embed = llm.get_input_embeddings()
    stops = {tok.eos_token_id} if tok.eos_token_id is not None else set()
    out = []
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        feats = None
        if context == "image":
            feats = mllm.visual_tokens(pixels_of(Path(world_dir), [r["image"] for r in rows[i:i + batch]],
                                                 preprocess))
        sp = splice(embed, chunk, [torch.full_like(x, IGNORE_INDEX) for x in chunk], feats,
                    [context == "image"] * len(chunk), max_length=4096)
        out += _greedy(llm, tok, sp, max_new_tokens, stops)
    return [" ".join(a.split()[:len(r["answer"].split())]) for a, r in zip(out, rows, strict=True)]


@torch.inference_mode()
def lm_reads_context(llm_path: str, world_dir: str | Path, device: str = "cpu") -> dict:
    """Does the world's LM answer from its context? Each of a world's questions after its
    scene's caption (``caption``) and alone (``none``), text only: accuracy per type. An LM
    that reads would be well above the majority level with the caption and at it without."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from seacore.quiet import no_loading_bars

    with no_loading_bars():
        tok = AutoTokenizer.from_pretrained(llm_path)
        llm = AutoModelForCausalLM.from_pretrained(llm_path).to(device).eval()
    rows = questions(world_dir)
    return {c: answer_accuracy(context_answers(llm, tok, rows, c, world_dir), rows)
            for c in ("caption", "none")}


def _greedy(llm, tok, sp, max_new_tokens: int, stops: set[int]) -> list[str]:
    """Greedy decoding of a right-padded spliced batch (moved to left padding)."""
    embed = llm.get_input_embeddings()
    n_seq = sp.inputs_embeds.shape[0]
    lens = sp.attention_mask.sum(1)
    T = sp.inputs_embeds.shape[1]
    x = torch.zeros_like(sp.inputs_embeds)
    mask = torch.zeros_like(sp.attention_mask)
    for b in range(n_seq):  # right padding -> left padding
        n = int(lens[b])
        x[b, T - n:] = sp.inputs_embeds[b, :n]
        mask[b, T - n:] = 1
    gen = [[] for _ in range(n_seq)]
    done = torch.zeros(n_seq, dtype=torch.bool)
    for _ in range(max_new_tokens):
        pos = (mask.cumsum(1) - 1).clamp(min=0)
        logits = llm(inputs_embeds=x, attention_mask=mask, position_ids=pos, logits_to_keep=1).logits[:, -1]
        nxt = logits.argmax(-1)
        for b, t in enumerate(nxt.tolist()):  # one device sync a token, not one a sample
            if not done[b]:
                if t in stops:
                    done[b] = True
                else:
                    gen[b].append(t)
        if bool(done.all()):
            break
        x = torch.cat([x, embed(nxt)[:, None].to(x.dtype)], dim=1)
        mask = torch.cat([mask, mask.new_ones(n_seq, 1)], dim=1)
    return [tok.decode(g, skip_special_tokens=True).strip() for g in gen]


def _decode(mllm, tok, preprocess, root: Path, ids: list[torch.Tensor], images: list[str],
            max_new_tokens: int, batch: int, image: str) -> list[str]:
    """Batched greedy decoding (left-padded), stopping where ``trainer generate`` stops."""
    from trainer.model import IGNORE_INDEX, splice
    from trainer.prompts import stop_token_ids

    if image not in ("real", "zero", "swap"):
        raise ValueError(f"image must be real, zero or swap, got {image!r}")
    if image == "swap":  # each question gets the image of the next distinct scene
        distinct = sorted(set(images))
        nxt = {a: distinct[(i + 1) % len(distinct)] for i, a in enumerate(distinct)}
        images = [nxt[a] for a in images]
    stops = set(stop_token_ids(tok, "chat"))
    embed = mllm.llm.get_input_embeddings()
    out = []
    for i in range(0, len(ids), batch):
        chunk = ids[i:i + batch]
        px = pixels_of(root, images[i:i + batch], preprocess)
        if image == "zero":
            px = torch.zeros_like(px)
        feats = mllm.visual_tokens(px)
        sp = splice(embed, chunk, [torch.full_like(x, IGNORE_INDEX) for x in chunk], feats,
                    [True] * len(chunk), max_length=4096)
        out += _greedy(mllm.llm, tok, sp, max_new_tokens, stops)
    return out


def normalise_answer(a: str) -> str:
    return a.strip().lower().rstrip(".").strip()


def answer_accuracy(answers: list[str], rows: list[dict]) -> dict:
    """Exact match (after lower-casing and a trailing full stop) per question type and overall."""
    per: dict[str, list[bool]] = {}
    for a, r in zip(answers, rows, strict=True):
        per.setdefault(r["type"], []).append(normalise_answer(a) == r["answer"])
    out = {t: {"accuracy": float(np.mean(v)), "questions": len(v)} for t, v in sorted(per.items())}
    allv = [x for v in per.values() for x in v]
    out["all"] = {"accuracy": float(np.mean(allv)), "questions": len(allv)}
    return out


def majority_baseline(train_rows: list[dict], test_rows: list[dict]) -> dict:
    """Chance for answers: per type, the accuracy of always giving the type's most frequent
    training answer (what a model that ignores the image can reach)."""
    from collections import Counter

    top = {}
    for r in train_rows:
        top.setdefault(r["type"], Counter())[r["answer"]] += 1
    per: dict[str, list[bool]] = {}
    for r in test_rows:
        guess = top[r["type"]].most_common(1)[0][0] if r["type"] in top else ""
        per.setdefault(r["type"], []).append(guess == r["answer"])
    out = {t: float(np.mean(v)) for t, v in sorted(per.items())}
    out["all"] = float(np.mean([x for v in per.values() for x in v]))
    return out
