"""A small synthetic sample set in LLaVA-Pretrain's layout, for the tests and benchmarks
(no ground truth: that is ``world.scenes``).

Each image is a few coloured shapes on a background; its caption names them
("a red circle and a blue square on a green background"), so the tiny trainer has a
caption that depends on the image. ``sample_configs`` gives the extraction and stage-1
configs the benchmarks use on it.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {"red": (220, 30, 30), "green": (30, 170, 60), "blue": (40, 60, 220),
           "yellow": (240, 220, 40), "black": (10, 10, 10), "white": (245, 245, 245),
           "orange": (250, 140, 20), "purple": (140, 40, 170)}
SHAPES = ("circle", "square", "triangle")


def _draw(rng: random.Random, size: int) -> tuple[Image.Image, str]:
    bg = rng.choice(list(COLOURS))
    img = Image.new("RGB", (size, size), COLOURS[bg])
    d = ImageDraw.Draw(img)
    parts = []
    for _ in range(rng.randint(1, 3)):
        colour = rng.choice([c for c in COLOURS if c != bg])
        shape = rng.choice(SHAPES)
        r = rng.randint(size // 8, size // 3)
        cx, cy = rng.randint(r, size - r), rng.randint(r, size - r)
        box = [cx - r, cy - r, cx + r, cy + r]
        if shape == "circle":
            d.ellipse(box, fill=COLOURS[colour])
        elif shape == "square":
            d.rectangle(box, fill=COLOURS[colour])
        else:
            d.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=COLOURS[colour])
        parts.append(f"a {colour} {shape}")
    caption = " and ".join(parts) + f" on a {bg} background"
    return img, caption


def make_sample(out_dir: str | Path, n: int = 48, size: int = 96, seed: int = 0) -> Path:
    """Write ``n`` images under ``out_dir/images/<shard>/`` and ``out_dir/sample.json``."""
    out = Path(out_dir)
    rng = random.Random(seed)
    items = []
    for i in range(n):
        img, caption = _draw(rng, size)
        rel = f"{i // 100:05d}/{i:09d}.jpg"
        path = out / "images" / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(path, quality=95)
        items.append({
            "id": f"{i:09d}",
            "image": rel,
            "conversations": [
                {"from": "human", "value": "<image>\nRender a clear and concise summary of the photo."},
                {"from": "gpt", "value": caption},
            ],
        })
    (out / "sample.json").write_text(json.dumps(items, indent=1))
    return out / "sample.json"


def make_instruct_sample(sample_json: str | Path, out_json: str | Path, text_only: int = 6,
                         seed: int = 0) -> Path:
    """LLaVA-665k-style instruction data over the sample images: multi-turn conversations,
    ``<image>`` at the start or the end of the first turn, and some text-only samples."""
    rng = random.Random(seed)
    items = []
    for i, it in enumerate(json.loads(Path(sample_json).read_text())):
        caption = it["conversations"][1]["value"]
        bg = caption.rsplit(" on a ", 1)[1].replace(" background", "")
        q1 = "What is in the picture?"
        first = f"<image>\n{q1}" if i % 2 == 0 else f"{q1}\n<image>"
        items.append({"id": f"inst-{it['id']}", "image": it["image"], "conversations": [
            {"from": "human", "value": first}, {"from": "gpt", "value": caption.capitalize() + "."},
            {"from": "human", "value": "What colour is the background?"},
            {"from": "gpt", "value": f"It is {bg}."}]})
    for j in range(text_only):
        a, b = rng.randint(1, 9), rng.randint(1, 9)
        items.append({"id": f"text-{j}", "conversations": [
            {"from": "human", "value": f"What is {a} plus {b}?"},
            {"from": "gpt", "value": f"{a} plus {b} is {a + b}."}]})
    rng.shuffle(items)
    Path(out_json).write_text(json.dumps(items, indent=1))
    return Path(out_json)


def sample_text() -> list[str]:
    """The sample's caption vocabulary, for a tiny LLM's tokenizer (one token per word)."""
    return [" ".join(list(COLOURS) + list(SHAPES) + ["a", "and", "on", "background"])]


def extract_config(out: Path, spec: str):
    """Extraction of ``out/sample`` with the tiny CLIP ``spec`` into ``out/shards``."""
    from pipeline.config import ExtractConfig
    from seacore.config import load_config

    return load_config(ExtractConfig, None, [
        f"encoder.model={spec}", "encoder.pretrained=null",
        f"input.json={out / 'sample' / 'sample.json'}",
        f"input.image_root={out / 'sample' / 'images'}",
        f"run.output={out / 'shards'}", "run.chunk_size=16", "run.batch_size=16",
        f"labels.text_cache_dir={out / 'cache'}", "run.overwrite=true",
    ])


def pretrain_config(out: Path, spec: str, llm: str, weight: float, *extra: str):
    """Stage 1 on ``out/sample`` with its labels (tiny CLIP ``spec``, tiny LLM ``llm``)."""
    from seacore.config import load_config
    from trainer.config import PretrainConfig

    return load_config(PretrainConfig, None, [
        f"vision.model={spec}", "vision.pretrained=null", f"llm.path={llm}",
        f"data.json={out / 'sample' / 'sample.json'}", f"data.image_root={out / 'sample' / 'images'}",
        f"data.shards={out / 'shards'}", "data.holdout_images=8", "data.num_workers=0",
        "optim.global_batch_size=8", "optim.micro_batch_size=4", "optim.epochs=20",
        "optim.lr=1e-2", "log.eval_every=0", "log.save_every=1000", f"sea.weight={weight}",
        f"log.output={out / 'runs' / f'pretrain-lambda{weight:g}'}", "log.progress=false",
        *extra,
    ])
