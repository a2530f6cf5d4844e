"""The paper's experiments as data: every row of Table 2, Table 3 and Table 1's SEA-PRIME
setting, with the towers, LLMs, data and the numbers the paper reports.

``configs/paper/`` is written from this by ``python -m paper write`` (and checked against it
by the tests), so a row's YAML files and its README line cannot drift apart. Settings follow
the paper (Sec. 5.1: n = 10, 2 x 2 window, two stages, 1 epoch, AdamW, cosine, LLaVA-1.5's
hyper-parameters; SEA-PRIME tunes the tower at 2e-6 in stage 2) and LLaVA-1.5's scripts
(stage 1: lr 1e-3, global batch 256; stage 2: lr 2e-5, global batch 128; max length 2048).
"""

from __future__ import annotations

from dataclasses import dataclass, field

BENCHMARKS = ("VQAv2", "TextVQA", "GQA", "SQA-I", "MMB", "POPE", "VizWiz", "MM-Vet")

# The paths a user sets (relative to the data root given to `python -m paper run`).
LLAVA_PRETRAIN_JSON = "LLaVA-Pretrain/blip_laion_cc_sbu_558k.json"
LLAVA_PRETRAIN_IMAGES = "LLaVA-Pretrain/images"
LLAVA_MIX_JSON = "llava_v1_5_mix665k.json"
LLAVA_MIX_IMAGES = "."  # coco/, gqa/, ocr_vqa/, textvqa/, vg/ under the data root
CAMBRIAN_ALIGN_JSON = "cambrian/alignment_2.5m.json"  # Cambrian-1's 2.5M caption pairs
CAMBRIAN_ALIGN_IMAGES = "cambrian/images"
CAMBRIAN_7M_JSON = "cambrian/Cambrian7M_withsystemprompt.json"  # as a JSON list (README)
CAMBRIAN_7M_IMAGES = "cambrian/images"

TOWERS = {
    # LLaVA-1.5's tower, as its users have it cached (transformers format, converted on load)
    "clip-l-336": {"model": "hf-clip:openai/clip-vit-large-patch14-336", "pretrained": None},
    "siglip-so400m-384": {"model": "ViT-SO400M-14-SigLIP-384", "pretrained": "webli"},
}

LLMS = {
    "vicuna7b": "lmsys/vicuna-7b-v1.5",
    "vicuna13b": "lmsys/vicuna-13b-v1.5",
    "gemma2b": "google/gemma-2b-it",
    "phi3": "microsoft/Phi-3-mini-4k-instruct",
    "llama3-8b": "meta-llama/Meta-Llama-3-8B-Instruct",
}


@dataclass
class Arm:
    """One trained model of a row: its stage-1 recipe (or another arm's stage 1) and stage 2."""

    name: str
    sea: bool  # lambda = 1 in stage 1
    vision_lr: float = 0.0  # stage 2 tunes the tower when > 0
    pretrain_from: str | None = None  # reuse this arm's stage 1 instead of training one
    paper: tuple | None = None  # the paper's numbers, in BENCHMARKS order (None: not reported)


@dataclass
class Row:
    name: str
    table: str
    tower: str
    llm: str
    arms: list[Arm]
    s2_scales: list[int] = field(default_factory=list)
    data: str = "llava"  # llava (0.5M + 0.6M) | cambrian (2.5M + 7M)
    note: str = ""

    @property
    def extract_config(self) -> str:
        return f"extract-{self.tower}{'-cambrian' if self.data == 'cambrian' else ''}.yaml"


def _t2(name, tower, llm, base, sea, s2=()):
    return Row(name, "Table 2", tower, llm,
               [Arm("llava", False, paper=base), Arm("sea", True, paper=sea)], list(s2))


_ = None
ROWS = {r.name: r for r in [
    _t2("t2-clip-l-336-vicuna7b", "clip-l-336", "vicuna7b",
        (78.8, 58.3, 62.0, 67.9, 66.2, 86.5, 45.7, 30.7), (79.1, 58.9, 63.2, 69.4, 66.8, 87.6, 48.8, 31.9)),
    _t2("t2-clip-l-336-gemma2b", "clip-l-336", "gemma2b",
        (72.5, 43.7, 56.0, 61.3, 54.0, 84.4, 38.7, 23.9), (76.6, 49.7, 60.9, 62.5, 59.5, 87.0, 39.5, 27.6)),
    _t2("t2-clip-l-336-phi3", "clip-l-336", "phi3",
        (77.4, 54.6, 60.8, 73.0, 68.7, 86.5, 37.1, 35.4), (77.5, 55.3, 61.0, 74.2, 69.4, 87.0, 39.0, 34.7)),
    _t2("t2-clip-l-336-llama3-8b", "clip-l-336", "llama3-8b",
        (79.4, 57.7, 63.7, 76.0, 72.5, 87.0, 48.1, 34.0), (79.6, 58.0, 63.8, 76.6, 72.0, 87.0, 45.2, 36.3)),
    _t2("t2-clip-l-336-vicuna13b", "clip-l-336", "vicuna13b",
        (80.0, 60.8, 63.3, 71.6, 67.7, 87.6, 53.6, 35.1), (79.8, 60.4, 63.8, 71.7, 68.0, 87.6, 57.3, 35.8)),
    _t2("t2-siglip-so400m-384-vicuna7b", "siglip-so400m-384", "vicuna7b",
        (80.8, 62.3, 63.2, 70.6, 68.0, 86.7, 51.1, 32.9), (80.9, 62.6, 63.4, 71.3, 68.4, 87.3, 52.4, 34.6)),
    _t2("t2-s2-clip-l-1008-vicuna7b", "clip-l-336", "vicuna7b",
        (79.7, 60.3, 63.2, 68.3, 67.3, 87.4, 50.7, 33.0), (79.8, 60.6, 63.7, 69.0, 66.4, 87.5, 48.5, 33.2),
        s2=(336, 672, 1008)),
    # Table 3 reports VQAv2, TextVQA, GQA, SQA, MMB, VizWiz only (POPE and MM-Vet: None)
    Row("t3-finetune-ve-vicuna7b", "Table 3", "clip-l-336", "vicuna7b", [
        Arm("baseline", False, paper=(78.8, 58.3, 62.0, 67.9, 66.2, _, 45.7, _)),
        Arm("tune-ve", False, vision_lr=2e-6, pretrain_from="baseline",
            paper=(80.3, 59.1, 63.4, 67.0, 66.1, _, 50.3, _)),
        Arm("sea-tune-ve", True, vision_lr=2e-6, paper=(80.5, 59.5, 63.6, 69.5, 68.0, _, 51.6, _)),
    ]),
    Row("t1-sea-prime-vicuna7b", "Table 1", "siglip-so400m-384", "vicuna7b", [
        Arm("sea-prime", True, vision_lr=2e-6, paper=(81.4, 67.2, 63.1, 73.9, 75.6, 88.4, 63.8, 44.2)),
    ], data="cambrian",
        note="SEA-PRIME with the other LLMs of Table 1: set llm.path (gemma2b: 81.0 60.7 62.4 69.2 "
             "68.8 87.8 61.9 38.0; phi3: 80.7 64.0 62.0 78.7 72.6 87.0 61.9 46.8; llama3-8b: "
             "83.1 68.0 65.1 79.0 76.0 87.4 64.7 46.0; vicuna13b: 81.9 66.2 64.3 80.9 76.9 86.7 "
             "63.6 48.8)"),
]}
