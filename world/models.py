"""The world's models, trained from scratch on CPU and saved in the formats the real loaders
read: a CLIP (open_clip's own model classes and contrastive loss, image-caption pairs only, no
patch labels, as real CLIPs are trained) and a small causal LM (Llama architecture, trained on
the world's text, ``save_pretrained``). Both are cached by seed and config under
``$SEA_CACHE/world/`` (or a given folder): a second run with the same settings loads them.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch

from world import scenes
from world.metrics import pixels_of


@dataclass
class ClipSpec:
    image_size: int = 64
    patch_size: int = 8
    width: int = 96
    layers: int = 4
    text_width: int = 64
    text_layers: int = 2
    embed_dim: int = 64
    context_length: int = 40
    steps: int = 1000
    batch_size: int = 128
    lr: float = 1e-3
    seed: int = 0
    # > 1: each batch is groups of this many fresh scenes that differ only in their objects'
    # shapes (same background, colours, sizes, places), so that colour and background alone
    # cannot tell a group's captions apart; 0: the world's training scenes, as they are
    shape_group: int = 0

    def model_cfg(self) -> dict:
        return {"embed_dim": self.embed_dim,
                "vision_cfg": {"image_size": self.image_size, "layers": self.layers,
                               "width": self.width, "head_width": 32, "patch_size": self.patch_size},
                "text_cfg": {"context_length": self.context_length, "vocab_size": 49408,
                             "width": self.text_width, "heads": self.text_width // 32,
                             "layers": self.text_layers}}


@dataclass
class LMSpec:
    hidden: int = 128
    layers: int = 3
    heads: int = 4
    vocab_size: int = 4096
    steps: int = 600
    batch_size: int = 32
    lr: float = 3e-3
    seed: int = 0
    # also train on one text per scene, its caption and then its questions with their
    # answers (scenes.world_text): an LM that answers from its context
    scene_documents: bool = False


def spec_key(spec, world_key: str, device: str = "cpu") -> str:
    """The cache key of a model: its spec, what it learns from and, off the CPU, the device
    type (a CUDA-trained model is another model: other kernels, other numbers)."""
    kind = torch.device(device).type
    key = [asdict(spec), world_key] + ([kind] if kind != "cpu" else [])
    return hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]


def _cosine(step: int, total: int, warm: int) -> float:
    if step < warm:
        return (step + 1) / warm
    return 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))


def _obj(d: dict) -> scenes.Obj:
    return scenes.Obj(**d)


def _scene_of(r: dict) -> scenes.Scene:
    return scenes.Scene(r["regions"][0][0], [_obj(o) for o in r["objects"]], *r["size"])


def train_clip(world_dir: str | Path, out_dir: str | Path, spec: ClipSpec, progress=None,
               device: str = "cpu") -> tuple[str, dict]:
    """Train (or load from ``out_dir``) the world's CLIP; -> (``local-dir:`` spec, training log).
    Each epoch draws fresh caption phrasings of the same scenes; with ``spec.shape_group``
    every batch is fresh scenes in shape groups instead (``shape_groups``)."""
    import open_clip
    from open_clip.loss import ClipLoss
    from safetensors.torch import save_file

    out = Path(out_dir)
    weights = out / "open_clip_model.safetensors"
    if weights.is_file() and (out / "train_log.json").is_file():
        return f"local-dir:{out}", json.loads((out / "train_log.json").read_text())
    root = Path(world_dir)
    records = list(scenes.read_truth(root / "ground_truth.jsonl").values())
    name = f"world-clip-{spec_key(spec, str(root))}"
    cfg = spec.model_cfg()
    torch.manual_seed(spec.seed)
    open_clip.factory._MODEL_CONFIGS[name] = cfg  # only to build it; loading uses the folder
    try:
        from seacore.quiet import building_random_model

        with building_random_model():
            model, _, preprocess = open_clip.create_model_and_transforms(name)
    finally:
        open_clip.factory._MODEL_CONFIGS.pop(name, None)
    tokenizer = open_clip.get_tokenizer("ViT-B-32", context_length=spec.context_length)
    model.to(device)
    if spec.shape_group <= 1:  # shape groups render their own scenes
        pixels = pixels_of(root, [r["image"] for r in records], preprocess)
        scene_list = [_scene_of(r) for r in records]
    loss_fn = ClipLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(spec.seed)
    log, t0, images = [], time.time(), 0
    model.train()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * _cosine(step, spec.steps, max(1, spec.steps // 20))
        if spec.shape_group > 1:
            batch = shape_groups(spec, step)
            caps = [scenes.caption(sc, random.Random(f"{spec.seed}-{step}-{k}-cap"))
                    for k, sc in enumerate(batch)]
            px = torch.stack([preprocess(scenes.render(sc)[0]) for sc in batch])
        else:
            idx = torch.randint(len(records), (spec.batch_size,), generator=gen)
            caps = [scenes.caption(scene_list[i], random.Random(f"{spec.seed}-{step}-{int(i)}"))
                    for i in idx]
            px = pixels[idx]
        images += len(px)
        img_f, txt_f, scale = model(px.to(device), tokenizer(caps).to(device))
        loss = loss_fn(img_f, txt_f, scale)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == spec.steps - 1:
            log.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.time() - t0, 1)})
        if progress is not None:
            progress(step + 1, spec.steps, float(loss.detach()))
    model.eval()
    out.mkdir(parents=True, exist_ok=True)
    (out / "open_clip_config.json").write_text(json.dumps({
        "name": name, "model_cfg": cfg,
        "preprocess_cfg": {"mean": list(open_clip.OPENAI_DATASET_MEAN),
                           "std": list(open_clip.OPENAI_DATASET_STD)}}, indent=2))
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    tmp = weights.with_suffix(".tmp")
    save_file(state, str(tmp))
    tmp.replace(weights)
    info = {"spec": asdict(spec), "log": log, "seconds": round(time.time() - t0, 1), "device": device,
            "train_images": images if spec.shape_group > 1 else len(records)}
    (out / "train_log.json").write_text(json.dumps(info, indent=1))
    return f"local-dir:{out}", info


def shape_groups(spec: ClipSpec, step: int) -> list[scenes.Scene]:
    """One CLIP batch of fresh scenes in groups of ``spec.shape_group``: a group shares its
    background, texture and objects' colours, sizes, patterns and places, and each scene of it
    gives the objects another tuple of shapes (a one-object group holds at most six scenes, so
    a batch can be a little smaller than ``batch_size``; the overlap rule is not re-checked:
    a shape keeps its object's centre and radius). Drawn from their own RNG stream
    (``clip-...``), not the world's scene ids, so no held-out scene is among them except by
    chance."""
    out: list[scenes.Scene] = []
    k = spec.shape_group
    for g in range(spec.batch_size // k):
        rng = random.Random(f"clip-{spec.seed}-{step}-{g}")
        base = scenes.sample_scene(rng)
        seen: set[tuple[str, ...]] = set()
        for _ in range(20 * k):
            shapes = tuple(rng.choice(scenes.SHAPES) for _ in base.objects)
            if shapes in seen:
                continue
            seen.add(shapes)
            out.append(replace(base, objects=[replace(o, shape=s)
                                              for o, s in zip(base.objects, shapes)]))
            if len(seen) == k:
                break
    return out


ZERO_SHOT_PROMPTS = {"colour": "a {} object", "shape": "a {}", "background": "on {}"}


@torch.inference_mode()
def zero_shot(spec_str: str, world_dir: str | Path) -> dict:
    """Image-level zero-shot on held-out scenes, per family: the share of images whose best
    word (over the family's words) is present in the scene; chance = mean share of the
    family's words present."""
    from pipeline.encoders import load_encoder

    enc = load_encoder(spec_str)
    root = Path(world_dir)
    records = list(scenes.read_truth(root / "ground_truth.jsonl").values())
    img = enc.model.encode_image(pixels_of(root, [r["image"] for r in records], enc.preprocess),
                                 normalize=True)
    out = {}
    for fam, tmpl in ZERO_SHOT_PROMPTS.items():
        words = scenes.FAMILIES[fam]
        txt = enc.model.encode_text(enc.tokenizer([tmpl.format(w) for w in words]), normalize=True)
        best = (img @ txt.T).argmax(dim=1).tolist()
        present = [{w for reg in r["regions"] for w in reg} for r in records]
        hit = [words[b] in p for b, p in zip(best, present)]
        chance = [len(p & set(words)) / len(words) for p in present]
        out[fam] = {"accuracy": float(np.mean(hit)), "chance": float(np.mean(chance)),
                    "images": len(records)}
    return out


def train_lm(texts: list[str], words: list[str], out_dir: str | Path, spec: LMSpec,
             progress=None, device: str = "cpu") -> tuple[str, dict]:
    """A tokenizer and a small Llama trained on the world's ``texts``; -> (folder, log)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from trainer.tiny import save_tiny_llm

    out = Path(out_dir)
    if (out / "train_log.json").is_file():
        return str(out), json.loads((out / "train_log.json").read_text())
    save_tiny_llm(out, words, seed=spec.seed, vocab_size=spec.vocab_size, hidden=spec.hidden,
                  layers=spec.layers, heads=spec.heads, extra_text=texts)
    from seacore.quiet import no_loading_bars

    with no_loading_bars():
        tok = AutoTokenizer.from_pretrained(out)
        model = AutoModelForCausalLM.from_pretrained(out)
    model.to(device)
    rows = [tok(t + tok.eos_token, add_special_tokens=False)["input_ids"] for t in texts]
    opt = torch.optim.AdamW(model.parameters(), lr=spec.lr, weight_decay=0.0)
    rng = random.Random(spec.seed)
    torch.manual_seed(spec.seed)
    log, t0 = [], time.time()
    model.train()
    for step in range(spec.steps):
        for g in opt.param_groups:
            g["lr"] = spec.lr * _cosine(step, spec.steps, max(1, spec.steps // 20))
        batch = [[tok.bos_token_id] + rows[rng.randrange(len(rows))] for _ in range(spec.batch_size)]
        n = max(map(len, batch))
        ids = torch.full((len(batch), n), tok.pad_token_id)
        labels = torch.full((len(batch), n), -100)
        for i, b in enumerate(batch):
            ids[i, :len(b)] = torch.tensor(b)
            labels[i, :len(b)] = torch.tensor(b)
        loss = model(input_ids=ids.to(device), attention_mask=(labels != -100).long().to(device),
                     labels=labels.to(device)).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if step % 50 == 0 or step == spec.steps - 1:
            log.append({"step": step, "loss": float(loss.detach()), "seconds": round(time.time() - t0, 1)})
        if progress is not None:
            progress(step + 1, spec.steps, float(loss.detach()))
    model.cpu().save_pretrained(out, safe_serialization=True)
    info = {"spec": asdict(spec), "log": log, "seconds": round(time.time() - t0, 1), "device": device,
            "sentences": len(texts)}
    (out / "train_log.json").write_text(json.dumps(info, indent=1))
    return str(out), info
