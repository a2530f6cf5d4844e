"""``make evidence``: the ground-truth world's protocol, end to end.

1. Scenes: a training world and a held-out world (disjoint scene indices, same seed).
2. Models: the world's CLIP (image-caption pairs only) and a small LM (the world's text; with
   ``scene_documents``, also each scene's caption followed by its Q&A), and whether the LM
   answers from a text context (``metrics.lm_reads_context``).
3. Label precision: the real extraction over the held-out scenes in every mode (``sea``,
   ``vanilla``, ``surgery`` with ``token`` and ``cls`` weights), against the full 2of12 list
   and the world's 28-word vocabulary, scored against the ground truth. The best mode on the
   protocol's ``label_list`` (top-1 precision, fixed in advance) makes the primary labels.
4. SEA's effect: stage 1 with lambda = 0 and 1 on the training scenes, several seeds, each
   lambda = 1 arm paired with lambda = 0 of its seed; the primary arms go on to stage 2 with
   a learning curve. Per run after stage 1: truth match (plain and balanced per dominant
   word, with the hub share), held-out L_a at ``criterion_tau`` (was the treatment
   delivered?), the questions answered from the visual tokens with the LM frozen, caption
   loss. The arms: ``arms``.
5. ``EVIDENCE.md``, ``results.json`` (with a ``summary`` for machines) and figures.

The full protocol is the committed file ``evidence/protocol-v3.json`` (its sha256 is printed
in the report), equal to ``PRESETS["full"]``; fixed before any lambda = 1 against lambda = 0
endpoint is looked at and not tuned toward a result. ``PRESETS`` also holds the quick and
demo sizes. ``evidence/protocol-v2.json`` still loads (``load_protocol``) as it ran.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import platform
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from seacore.device import pick_device
from wordlist import sha256_file
from world import metrics, scenes
from world.models import ClipSpec, LMSpec, spec_key, train_clip, train_lm, zero_shot

MODES = (("sea", "token"), ("vanilla", "token"), ("surgery", "token"), ("surgery", "cls"))


@dataclass
class Protocol:
    version: int = 3
    train_scenes: int = 3000  # the CLIP's and the LM's training scenes
    mllm_scenes: int = 2000  # the first of them: stage 1 and stage 2 data (as LLaVA's own sets)
    test_scenes: int = 300
    world_seed: int = 0
    clip: ClipSpec = field(default_factory=ClipSpec)
    lm: LMSpec = field(default_factory=LMSpec)
    seeds: tuple[int, ...] = (0, 1, 2)
    secondary_seeds: tuple[int, ...] = ()  # the secondary arms' seeds (empty: ``seeds``)
    runner: str = "ray"
    top_n: int = 10
    surgery_depth: int = 2  # half the world CLIP's 4 blocks, the reference's ratio on ViT-B/16
    stage1_epochs: int = 1  # LLaVA-1.5: one epoch per stage
    stage1_lr: float = 1e-3  # LLaVA-1.5's
    stage2_epochs: int = 1
    stage2_lr: float = 5e-4  # a from-scratch 128-wide LM; LLaVA's 2e-5 is for a pretrained 7B
    global_batch: int = 32
    micro_batch: int = 32
    holdout: int = 96  # training-set images the trainer's periodic eval-align uses
    evals_per_run: int = 6
    objectives_best: tuple[str, ...] = ("sampled",)
    sea_default_arm: bool = False  # also train on the paper's default labels when they are not the best
    # lambda = 1 arms on the best labels, one per start temperature: 1 (the paper's "tau = 0"
    # read as log tau = 0, the default) and CLIP's 0.07
    tau_arms: tuple[float, ...] = (1.0, 0.07)
    tau_lr_scale: float = 10.0  # the temperature's learning rate over the adapter's (sea.tau_lr_scale)
    # protocol v3: the primary labels come from this list ("world": the world's vocabulary, the
    # analogue of a real CLIP's known words; "full": 2of12, which the world's CLIP never saw),
    # the mode chosen by top-1 precision over that list on the held-out scenes; each patch's
    # first train_top_k labels train (sea.top_k; 0: all top_n)
    label_list: str = "world"
    train_top_k: int = 1
    # secondary arms (stage 1 only): lambda = 1 on the primary list with all top_n labels
    # (the paper's n), and on the full 2of12 list (its best mode, all top_n labels)
    all_labels_arm: bool = True
    full_list_arm: bool = True
    # the temperature at which held-out L_a is compared between lambda = 1 and lambda = 0 (the
    # treatment-delivered criterion); None: no criterion (protocols before v3)
    criterion_tau: float | None = 0.07
    lm_small: LMSpec | None = None  # a second, smaller LM: lambda = 0 and 1 (tau_arms[0]) on it
    stage2: bool = True
    # which arms go on to stage 2: "all", or "primary" (lambda = 0 and lambda = 1 at
    # tau_arms[0] on the best labels, for each LM); the others are measured after stage 1
    # (token-level alignment, where the paper claims SEA's effect) and cost a fifth as much
    stage2_arms: str = "all"
    curve_points: int = 5  # stage-2 learning curve: accuracy at this many evenly spaced steps
    curve_scenes: int = 100  # held-out scenes each curve point asks (the end: all of them)


PRESETS = {
    # protocol v3, as evidence/protocol-v3.json fixes it (a test holds the two together)
    "full": Protocol(lm=LMSpec(steps=1500, scene_documents=True), seeds=(0, 1, 2, 3, 4),
                     secondary_seeds=(0, 1), stage1_epochs=6, stage2_epochs=4, stage2_lr=1e-3,
                     stage2_arms="primary", curve_points=4, tau_arms=(1.0, 0.07)),
    "demo": Protocol(train_scenes=600, mllm_scenes=600, test_scenes=100, clip=ClipSpec(steps=250),
                     lm=LMSpec(steps=150, scene_documents=True), seeds=(0,), runner="local",
                     stage1_epochs=3, objectives_best=("sampled",), stage2=False, holdout=48,
                     tau_arms=(0.07,), all_labels_arm=False, full_list_arm=False),
    "quick": Protocol(train_scenes=320, mllm_scenes=320, test_scenes=48, clip=ClipSpec(steps=60, batch_size=64),
                      lm=LMSpec(steps=60, scene_documents=True), seeds=(0,), stage1_epochs=1,
                      tau_arms=(0.07,), all_labels_arm=False, full_list_arm=False,
                      curve_points=2, curve_scenes=16,
                      runner="local",  # the test suite's time: test_ray.py covers the Ray runner
                      stage2_epochs=1, objectives_best=("sampled",), holdout=32,
                      evals_per_run=2, stage2_arms="primary"),
}


def _cache_root() -> Path:
    from pipeline.textemb import cache_root

    return cache_root() / "world"


PROTOCOL_FILE = Path(__file__).resolve().parents[1] / "evidence" / "protocol-v3.json"
# what protocol v2 ran, for the fields that came with v3 (its file does not name them)
V2_DEFAULTS = {"version": 2, "label_list": "full", "train_top_k": 0, "all_labels_arm": False,
               "full_list_arm": False, "criterion_tau": None, "tau_lr_scale": 1.0,
               "sea_default_arm": True}


def load_protocol(path: str | Path) -> tuple[Protocol, str]:
    """A protocol file (JSON: the ``Protocol`` fields, plus free-text ``analysis`` and
    ``sizing`` notes that the code does not read) and its sha256."""
    raw = Path(path).read_bytes()
    d = {k: v for k, v in json.loads(raw).items() if k in {f.name for f in fields(Protocol)}}
    if d.get("version", 2) < 3:  # fields v3 added, as v2 ran them
        d = {**V2_DEFAULTS, **d}
    d["clip"] = ClipSpec(**d.get("clip", {}))
    d["lm"] = LMSpec(**d.get("lm", {}))
    if d.get("lm_small") is not None:
        d["lm_small"] = LMSpec(**d["lm_small"])
    for k in ("seeds", "secondary_seeds", "objectives_best", "tau_arms"):
        if k in d:
            d[k] = tuple(d[k])
    return Protocol(**d), hashlib.sha256(raw).hexdigest()


class Evidence:
    def __init__(self, proto: Protocol, out: str | Path, work: str | Path | None = None,
                 cache: str | Path | None = None, progress: bool = True,
                 protocol_file: str | Path | None = None, protocol_sha256: str | None = None,
                 device: str = "auto"):
        self.p = proto
        # every model trained and evaluated here: auto is CUDA when present, as in the trainer
        self.device = str(pick_device(device, key="--device"))
        self.protocol_file = protocol_file
        self.protocol_sha256 = protocol_sha256 or hashlib.sha256(
            json.dumps(_jsonable(asdict(proto)), sort_keys=True).encode()).hexdigest()
        self.out = Path(out).resolve()
        self.work = Path(work).resolve() if work else self.out / "work"
        self.cache = Path(cache).resolve() if cache else _cache_root()
        self.progress = progress
        self.results: dict = {"protocol": _jsonable(asdict(proto))}
        self.timings: dict[str, float] = {}

    # --- steps -------------------------------------------------------------------------------
    def _timed(self, name: str, fn, *args):
        t = time.time()
        r = fn(*args)
        self.timings[name] = round(time.time() - t, 1)
        return r

    def worlds(self) -> None:
        p = self.p
        img, grid = p.clip.image_size, (p.clip.image_size // p.clip.patch_size,) * 2
        self.train_dir, self.test_dir = self.work / "world-train", self.work / "world-test"
        for d, n, start in ((self.train_dir, p.train_scenes, 0), (self.test_dir, p.test_scenes, 10**6)):
            stamp = d / "done.json"
            want = {"n": n, "seed": p.world_seed, "start": start, "image_size": img,
                    "generator": sha256_file(scenes.__file__)}  # the scene code itself
            if stamp.is_file() and json.loads(stamp.read_text()) == want:
                continue
            shutil.rmtree(d, ignore_errors=True)
            scenes.make_world(d, n, p.world_seed, img, grid, start=start)
            stamp.write_text(json.dumps(want))
        for name in ("captions", "instruct"):  # the MLLM's data: the first mllm_scenes scenes
            items = json.loads((self.train_dir / f"{name}.json").read_text())[:p.mllm_scenes]
            (self.train_dir / f"{name}-mllm.json").write_text(json.dumps(items))
        (self.work / "vocab.txt").write_text("\n".join(scenes.VOCAB) + "\n")
        self.results["world"] = {"train_scenes": p.train_scenes, "mllm_scenes": p.mllm_scenes,
                                 "test_scenes": p.test_scenes,
                                 "grid": list(grid), "vocab": list(scenes.VOCAB),
                                 "min_area": scenes.MIN_AREA,
                                 "ground_truth": str(self.test_dir / "ground_truth.jsonl")}

    def models(self) -> None:
        p = self.p
        key = sha256_file(self.train_dir / "ground_truth.jsonl")  # what the models learn from
        bar = self._bar("train CLIP", p.clip.steps)
        self.clip, info = train_clip(self.train_dir, self.cache / f"clip-{spec_key(p.clip, key, self.device)}",
                                     p.clip, self._tick(bar), self.device)
        bar.close()
        self.results["clip"] = {"spec": asdict(p.clip), "final_loss": info["log"][-1]["loss"],
                                "train_seconds": info["seconds"],
                                "zero_shot": zero_shot(self.clip, self.test_dir)}
        from wordlist import load_wordlist

        words = list(load_wordlist().words)
        self.llms = {}
        for name, spec in (("main", p.lm), ("small", p.lm_small)):
            if spec is None:
                continue
            texts = scenes.world_text(self.train_dir, spec.scene_documents)
            text_key = hashlib.sha256("\n".join(texts).encode()).hexdigest()[:16]
            bar = self._bar(f"train LM ({name})", spec.steps)
            self.llms[name], info = train_lm(
                texts, words, self.cache / f"lm-{spec_key(spec, key + text_key, self.device)}", spec,
                self._tick(bar), self.device)
            bar.close()
            self.results["lm" if name == "main" else "lm_small"] = {
                "spec": asdict(spec), "final_loss": info["log"][-1]["loss"],
                "train_seconds": info["seconds"], "sentences": len(texts),
                "reads_context": metrics.lm_reads_context(self.llms[name], self.test_dir, self.device)}
        self.llm = self.llms["main"]

    def extract(self, world: Path, mode: tuple[str, str], wordlist: str | None, name: str,
                json_name: str = "captions.json") -> Path:
        from pipeline.config import ExtractConfig
        from pipeline.runner import run
        from seacore.config import load_config

        out = self.work / "shards" / name
        cfg = load_config(ExtractConfig, None, [
            f"encoder.model={self.clip}", "encoder.pretrained=null",
            f"input.json={world / json_name}", f"input.image_root={world / 'images'}",
            f"run.output={out}", "run.chunk_size=512", "run.batch_size=64",
            f"run.runner={self.p.runner}", f"run.progress={str(self.progress).lower()}",
            f"labels.mode={mode[0]}", f"labels.surgery_weights={mode[1]}",
            f"labels.surgery_depth={self.p.surgery_depth}", f"labels.top_n={self.p.top_n}",
            f"labels.text_cache_dir={self.work / 'text-cache'}",
            f"labels.wordlist={wordlist or 'null'}", "run.overwrite=true",
        ])
        summary = run(cfg)
        if not summary.get("complete"):
            raise RuntimeError(f"extraction {name} did not complete: {summary}")
        return out

    def precision(self) -> None:
        from wordlist import load_wordlist

        full = load_wordlist().words
        table = {}
        for mode in MODES:
            name = _mode_name(mode)
            for lst, words in (("full", full), ("world", scenes.VOCAB)):
                shards = self.extract(self.test_dir, mode, self._wordlist(lst), f"test-{name}-{lst}")
                table.setdefault(name, {})[lst] = metrics.label_precision(
                    shards, self.test_dir / "ground_truth.jsonl", words)
        self.results["label_precision"] = table
        # the criterion fixed in advance: top-1 precision on the held-out scenes, over the
        # primary list (best_mode) and, for the full-list arm, over 2of12 (best_mode_full)
        self.best = {}
        for lst in ("full", "world"):
            best = max(table, key=lambda m, lst=lst: table[m][lst]["top1_precision"]["value"])
            self.best[lst] = next(m for m in MODES if _mode_name(m) == best)
        self.best_mode = self.best[self.p.label_list]
        self.results["best_mode"] = _mode_name(self.best_mode)
        self.results["best_mode_by_list"] = {k: _mode_name(v) for k, v in self.best.items()}

    def arms(self) -> list[dict]:
        """The stage-1 settings compared, each against the lambda = 0 arm of its LM. An arm's
        labels are (``mode``, ``list``, ``top_k``); ``primary`` marks the arms of the
        primary endpoints (lambda = 0 and lambda = 1 at tau_arms[0] on the best labels of the
        primary list), the only ones that go on to stage 2 with ``stage2_arms="primary"``."""
        p = self.p
        if p.stage2_arms not in ("all", "primary"):
            raise ValueError(f"protocol stage2_arms={p.stage2_arms!r}: expected 'all' or 'primary'")
        if p.label_list not in ("world", "full"):
            raise ValueError(f"protocol label_list={p.label_list!r}: expected 'world' or 'full'")
        # the key is set only where it holds, so other arms' run keys stay
        later = {"stage1_only": True} if p.stage2 and p.stage2_arms == "primary" else {}
        tau0 = math.log(p.tau_arms[0])
        labels = {"mode": self.best_mode, "list": p.label_list, "top_k": p.train_top_k}
        one = {"weight": 1.0, "log_tau_init": tau0, "tau_lr_scale": p.tau_lr_scale}
        arms = [{"name": "lambda=0", "weight": 0.0, "objective": "sampled", "lm": "main",
                 "primary": True, **labels}]
        desc = f"{_mode_name(self.best_mode)} labels ({p.label_list} list, top {p.train_top_k or p.top_n})"
        for tau in p.tau_arms:
            for obj in p.objectives_best:
                primary = tau == p.tau_arms[0] and obj == "sampled"
                arms.append({**one, "name": f"lambda=1 {obj}, {desc}, tau0={tau:g}", "objective": obj,
                             "log_tau_init": math.log(tau), "lm": "main", "primary": primary,
                             **labels, **({} if primary else later)})
        if p.all_labels_arm and p.train_top_k not in (0, p.top_n):
            arms.append({**one, "name": f"lambda=1 sampled, {_mode_name(self.best_mode)} labels "
                                        f"({p.label_list} list, all top {p.top_n}), tau0={p.tau_arms[0]:g}",
                         "objective": "sampled", "lm": "main", "primary": False, **labels, "top_k": 0,
                         **later})
        if p.full_list_arm and p.label_list != "full":
            arms.append({**one, "name": f"lambda=1 sampled, {_mode_name(self.best['full'])} labels "
                                        f"(full list, top {p.top_n}), tau0={p.tau_arms[0]:g}",
                         "objective": "sampled", "lm": "main", "primary": False,
                         "mode": self.best["full"], "list": "full", "top_k": 0, **later})
        if p.sea_default_arm and self.best_mode != ("sea", "token"):
            arms.append({**one, "name": f"lambda=1 sampled, sea labels, tau0={p.tau_arms[0]:g}",
                         "objective": "sampled", "lm": "main", "primary": False, **labels,
                         "mode": ("sea", "token"), **later})
        if p.lm_small is not None:
            arms.append({"name": "lambda=0, small LM", "weight": 0.0, "objective": "sampled",
                         "lm": "small", "primary": False, **labels, **later})
            arms.append({**one, "name": f"lambda=1 sampled, {desc}, tau0={p.tau_arms[0]:g}, small LM",
                         "objective": "sampled", "lm": "small", "primary": False, **labels, **later})
        return arms

    def _stage2(self, arm: dict) -> bool:
        return self.p.stage2 and not arm.get("stage1_only")

    def labels(self) -> None:
        """Every extraction, in one Ray session: the held-out scenes in each mode and list
        (label precision), then the training scenes in the modes the arms train on."""
        with self.ray_session():
            self.precision()
            self.train_labels = {}
            for arm in self.arms():
                key = (arm["mode"], arm["list"])
                if key not in self.train_labels:
                    self.train_labels[key] = self.extract(
                        self.train_dir, arm["mode"], self._wordlist(arm["list"]),
                        f"train-{_mode_name(arm['mode'])}-{arm['list']}", "captions-mllm.json")

    def _wordlist(self, lst: str) -> str | None:
        """The label search's word list: the world's vocabulary file, or None (2of12)."""
        return str(self.work / "vocab.txt") if lst == "world" else None

    def sea_effect(self) -> None:
        """Every arm and seed; a run recorded in an earlier ``results.json``, or in
        ``runs-partial.json`` (written after each run, so a killed evidence run keeps what it
        finished), with the same arm, seed and run settings (and whose folders are still
        there) is reused: a killed or extended evidence run only trains what is missing."""
        old = {}
        for prev in (self.out / "results.json", self.partial_file):
            if prev.is_file():
                for r in json.loads(prev.read_text()).get("runs", []):
                    old[r.get("run_key")] = r
        runs, reused = [], 0
        for arm in self.arms():
            for seed in (self.p.seeds if arm.get("primary", True) else self.p.secondary_seeds or self.p.seeds):
                key = self._run_key(arm, seed)
                r = old.get(key)
                dirs = ("stage1_dir", "stage2_dir") if self._stage2(arm) else ("stage1_dir",)
                if r is None or not all(Path(r.get(d, "")).is_dir() for d in dirs):
                    r = self._one_run(arm, seed)
                    r["run_key"] = key
                    old[key] = r
                    _write_json(self.partial_file, {"runs": list(old.values())})
                else:
                    reused += 1
                runs.append(r)
        self.results["reused_runs"] = reused
        self.results["runs"] = runs
        if self.p.stage2:
            mllm = {it["image"] for it in json.loads((self.train_dir / "instruct-mllm.json").read_text())}
            self.results["answer_chance"] = metrics.majority_baseline(  # what stage 2 saw
                [q for q in metrics.questions(self.train_dir) if q["image"] in mllm], metrics.questions(self.test_dir))
            self.results["evaluation"] = {
                "answers": "held-out questions inside their conversation, as stage 2 trained: "
                           "the image in the first turn, earlier questions with their true "
                           "answers, free greedy generation, exact match",
                "answers_alone": "each held-out question alone as the first turn",
                "blind": "lambda = 0 arm, training format, the image zeroed (zero) or another "
                         "scene's image (swap)"}

    @property
    def partial_file(self) -> Path:
        return self.out / "runs-partial.json"

    def _run_key(self, arm: dict, seed: int) -> str:
        """What a run's outcome depends on: the arm, the seed, the run settings, the data
        and what its labels are a function of (encoder weights, mode, extraction settings)."""
        p = asdict(self.p)
        fields = {k: p[k] for k in ("mllm_scenes", "world_seed", "clip", "lm", "stage1_epochs",
                                    "stage1_lr", "stage2_epochs", "stage2_lr", "global_batch",
                                    "micro_batch", "holdout", "evals_per_run", "stage2", "top_n",
                                    "surgery_depth", "curve_points", "curve_scenes", "lm_small",
                                    "criterion_tau")}
        weights = Path(self.clip[len("local-dir:"):]) / "open_clip_model.safetensors"
        blob = json.dumps([arm, seed, fields, self.device.split(":")[0], sha256_file(weights),
                           sha256_file(self.train_dir / "ground_truth.jsonl")], sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @functools.cache  # noqa: B019 (one Evidence per run; the held-out labels never change in it)
    def _test_labels(self, mode: tuple[str, str], lst: str) -> dict:
        return metrics.read_labels(self.work / "shards" / f"test-{_mode_name(mode)}-{lst}")[1]

    def _label_sets(self, arm: dict) -> list[tuple]:
        """The held-out label sets whose L_a a run is measured on: a lambda = 1 arm's own; for
        lambda = 0, every lambda = 1 arm's of the same LM (the criterion pairs them)."""
        if arm["weight"] > 0:
            return [(arm["mode"], arm["list"], arm["top_k"])]
        return sorted({(a["mode"], a["list"], a["top_k"]) for a in self.arms()
                       if a["weight"] > 0 and a["lm"] == arm["lm"]})

    def _one_run(self, arm: dict, seed: int) -> dict:
        from seacore.config import load_config
        from trainer.config import FinetuneConfig, PretrainConfig
        from trainer.train import build, train

        p = self.p
        tag = f"{arm['name'].replace(' ', '_').replace(',', '').replace('=', '')}-seed{seed}"
        labels = self.train_labels[(arm["mode"], arm["list"])]
        per_epoch = (p.mllm_scenes - p.holdout) // p.global_batch
        common = [f"vision.model={self.clip}", "vision.pretrained=null",
                  f"llm.path={self.llms[arm.get('lm', 'main')]}",
                  f"data.image_root={self.train_dir / 'images'}", "data.num_workers=0",
                  f"optim.global_batch_size={p.global_batch}", f"optim.micro_batch_size={p.micro_batch}",
                  f"optim.seed={seed}", "log.overwrite=true", f"log.progress={str(self.progress).lower()}",
                  "log.report_to=[]", f"device={self.device}"]
        s1 = load_config(PretrainConfig, None, common + [
            f"data.json={self.train_dir / 'captions-mllm.json'}", f"data.shards={labels}",
            f"data.holdout_images={p.holdout}", f"optim.epochs={p.stage1_epochs}",
            f"optim.lr={p.stage1_lr}", f"sea.weight={arm['weight']}", f"sea.objective={arm['objective']}",
            f"sea.log_tau_init={arm.get('log_tau_init', 0.0)}",
            f"sea.wordlist={self._wordlist(arm['list']) or 'null'}", f"sea.top_k={arm['top_k']}",
            f"sea.tau_lr_scale={arm.get('tau_lr_scale', 1.0)}",
            f"log.eval_every={max(1, per_epoch * p.stage1_epochs // p.evals_per_run)}",
            "log.save_every=100000", f"log.output={self.work / 'runs' / ('s1-' + tag)}"])
        t = time.time()
        parts = build(s1, "pretrain")
        r1 = train(s1, "pretrain", parts=parts)
        run = {"arm": arm["name"], "lm": arm.get("lm", "main"), "mode": _mode_name(arm["mode"]),
               "list": arm["list"], "top_k": arm["top_k"], "primary": arm["primary"],
               "weight": arm["weight"], "tau_final": r1.get("tau"),
               "objective": arm["objective"], "seed": seed, "stage1_steps": r1["step"],
               "stage1_seconds": round(time.time() - t, 1), "stage1_dir": s1.log.output,
               "holdout_align": r1["align"],
               "align_at_chance": r1["align_at_chance"]}  # the trainer's verdict (trainer/watch.py)
        run.update(self._stage1_measures(parts, arm))
        del parts
        if not self._stage2(arm):
            return run
        s2 = load_config(FinetuneConfig, None, common + [
            f"data.json={self.train_dir / 'instruct-mllm.json'}", f"optim.epochs={p.stage2_epochs}",
            f"optim.lr={p.stage2_lr}", f"init_from={s1.log.output}", "log.eval_every=0",
            "log.save_every=100000", f"log.output={self.work / 'runs' / ('s2-' + tag)}"])
        t = time.time()
        parts = build(s2, "finetune")
        curve_at = _curve_steps(parts.total_steps, p.curve_points)
        curve = []
        if 0 in curve_at:  # the stage-1 model, before stage 2 trains anything
            curve.append({"step": 0, **self._curve_point(parts)})

        def on_step(step: int) -> None:
            if step in curve_at and step < parts.total_steps:
                curve.append({"step": step, **self._curve_point(parts)})

        r2 = train(s2, "finetune", parts=parts, on_step=on_step)
        run["stage2_steps"] = r2["step"]
        run["stage2_dir"] = s2.log.output
        run["stage2_seconds"] = round(time.time() - t, 1)
        parts.task.eval()
        run.update(self._answers(parts, blind=arm["weight"] == 0))
        curve.append({"step": r2["step"], **{t: a["accuracy"] for t, a in run["answers"].items()}})
        run["stage2_curve"] = curve
        return run

    def _answers(self, parts, blind: bool) -> dict:
        """Held-out questions in the training format (inside the conversation, earlier turns
        with their true answers) and asked alone; with ``blind``, the training format again
        with the image zeroed and with another scene's image."""
        mllm, tok, pre = parts.task.mllm, parts.tokenizer, parts.encoder.preprocess
        turns = metrics.conversation_turns(self.test_dir)
        rows = metrics.questions(self.test_dir)
        given = metrics.conversation_answers(mllm, tok, pre, self.test_dir, turns)
        alone = metrics.greedy_answers(mllm, tok, pre, self.test_dir, rows)
        out = {"answers": metrics.answer_accuracy(given, turns),
               "answers_alone": metrics.answer_accuracy(alone, rows),
               "answer_examples": [{"question": r["messages"][-1]["content"], "turn": r["turn"],
                                    "answer": r["answer"], "given": a}
                                   for r, a in zip(turns[:12], given[:12], strict=True)]}
        if blind:
            out["blind"] = {m: metrics.answer_accuracy(metrics.conversation_answers(
                mllm, tok, pre, self.test_dir, turns, image=m), turns) for m in ("zero", "swap")}
        return out

    def _curve_point(self, parts) -> dict:
        """Accuracy per question type, training format, on the first ``curve_scenes`` held-out
        scenes (the learning curve's cost stays a fraction of the final evaluation's)."""
        parts.task.eval()
        turns = metrics.conversation_turns(self.test_dir)
        keep = sorted({t["image"] for t in turns})[: self.p.curve_scenes]
        turns = [t for t in turns if t["image"] in set(keep)]
        given = metrics.conversation_answers(parts.task.mllm, parts.tokenizer,
                                             parts.encoder.preprocess, self.test_dir, turns)
        return {t: a["accuracy"] for t, a in metrics.answer_accuracy(given, turns).items()}

    def _stage1_measures(self, parts, arm: dict) -> dict:
        """On the held-out world, after stage 1: alignment against the truth (over 2of12's
        table, so every arm is measured on the same words), eval-align against the arm's own
        labels, held-out L_a on each label set at ``criterion_tau``, the questions answered
        from the visual tokens alone (the LM frozen, endpoint b) and the caption loss."""
        from PIL import Image

        from trainer.align_eval import evaluate_alignment
        from trainer.sea_loss import load_word_tokens
        from wordlist import load_wordlist

        p, mllm = self.p, parts.task.mllm
        mllm.eval()
        rule = parts.cfg.sea.label_tokenization
        full = load_wordlist()
        out = {"alignment_truth": metrics.alignment_truth(
            mllm, load_word_tokens(parts.tokenizer, full, rule), full.words, self.test_dir,
            parts.encoder.preprocess, scenes.VOCAB)}
        root = self.test_dir / "images"
        pixel = functools.cache(lambda k: parts.encoder.preprocess(Image.open(root / k).convert("RGB")))
        own = self._test_labels(arm["mode"], arm["list"])
        rows = ({"pixel": pixel(k), "label_ids": own[k][0].astype("int64")} for k in sorted(own))
        out[f"eval_align_{_mode_name(arm['mode'])}_{arm['list']}"] = evaluate_alignment(
            mllm, parts.word_tokens, rows, lambda r: r)
        if p.criterion_tau is not None:
            out["heldout_align"] = {_label_key(*ls): self.heldout_align(parts, *ls, pixel)
                                    for ls in self._label_sets(arm)}
        rows = metrics.questions(self.test_dir)
        out["answers_from_tokens"] = metrics.answer_accuracy(metrics.context_answers(
            mllm.llm, parts.tokenizer, rows, "image", self.test_dir, mllm, parts.encoder.preprocess), rows)
        out["caption_loss"] = metrics.caption_loss(mllm, parts.tokenizer, parts.encoder.preprocess,
                                                   self.test_dir)
        return out

    def heldout_align(self, parts, mode: tuple[str, str], lst: str, top_k: int, pixel=None) -> dict:
        """Held-out L_a at ``criterion_tau`` on the test scenes' labels (``mode``, ``lst``,
        each patch's first ``top_k``), in micro-batches of the training's size: the
        treatment-delivered measure. ``pixel``: image name -> tensor (decoded here if None)."""
        from PIL import Image

        from trainer.align_eval import heldout_align_loss
        from trainer.sea_loss import load_word_tokens
        from wordlist import load_wordlist

        if pixel is None:
            root = self.test_dir / "images"
            pixel = functools.cache(lambda k: parts.encoder.preprocess(Image.open(root / k).convert("RGB")))
        mb, labels = self.p.micro_batch, self._test_labels(mode, lst)
        keys = sorted(labels)
        batches = ({"pixel": torch.stack([pixel(k) for k in keys[i:i + mb]]),
                    "label_ids": np.stack([labels[k][0] for k in keys[i:i + mb]]),
                    "label_scores": np.stack([labels[k][1] for k in keys[i:i + mb]])}
                   for i in range(0, len(keys), mb))
        wt = load_word_tokens(parts.tokenizer, load_wordlist(self._wordlist(lst)),
                              parts.cfg.sea.label_tokenization)
        mllm = parts.task.mllm
        return heldout_align_loss(mllm, wt, batches, mllm.grid, self.p.criterion_tau,
                                  parts.cfg.sea.window, top_k)

    # --- driver ------------------------------------------------------------------------------
    def run(self) -> dict:
        t0 = time.time()
        self.out.mkdir(parents=True, exist_ok=True)
        steps = [("scenes", self.worlds), ("models", self.models), ("labels", self.labels),
                 ("SEA effect", self.sea_effect)]
        for name, fn in steps:
            print(f"== evidence: {name} ==", file=sys.stderr, flush=True)
            self._timed(name, fn)
        self.results["timings_s"] = self.timings
        self.results["total_seconds"] = round(time.time() - t0, 1)
        self.results["machine"] = machine()
        self.results["device"] = self.device
        if self.protocol_file:
            self.results["protocol_file"] = str(self.protocol_file)
        from world.summary import machine_summary

        self.results["summary"] = machine_summary(self.results, self.protocol_sha256)
        from world import report

        _write_json(self.out / "results.json", self.results)
        self.partial_file.unlink(missing_ok=True)  # every run it held is in results.json now
        report.figures(self.results, self.out, self.test_dir, self.work)
        return self.results

    @contextlib.contextmanager
    def ray_session(self):
        """One local Ray for all the extractions (each run would otherwise start its own:
        about half a minute each on 2 cores); the runs find it already up and leave it."""
        if self.p.runner != "ray":
            yield
            return
        from pipeline.config import ExtractConfig
        from pipeline.ray_runner import init_ray, shutdown_ray
        from seacore.config import load_config

        started = init_ray(load_config(ExtractConfig, None, []))
        try:
            yield
        finally:
            if started:
                shutdown_ray()

    def _bar(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="step", disable=not self.progress)

    @staticmethod
    def _tick(bar):
        def f(done, total, loss):
            bar.n = done
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.refresh()
        return f


def _curve_steps(total: int, points: int) -> set[int]:
    """Stage-2 steps where the learning curve is read: 0 (the stage-1 model), ``points``
    evenly spaced steps, the last one the end of the stage (evaluated in full there)."""
    return {0} | {round(total * k / points) for k in range(1, points + 1)}


def _mode_name(mode: tuple[str, str]) -> str:
    return mode[0] if mode[0] != "surgery" else f"surgery-{mode[1]}"


def _label_key(mode: tuple[str, str], lst: str, top_k: int) -> str:
    return f"{_mode_name(mode)}/{lst}/top{top_k or 'all'}"


def _write_json(path: Path, obj) -> None:
    """Whole or not at all: a kill mid-write leaves the previous file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def _jsonable(d):
    return json.loads(json.dumps(d, default=list))


def machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_evidence(preset: str, out: str, work: str | None = None, cache: str | None = None,
                 progress: bool = True, device: str = "auto", **overrides) -> dict:
    """``full`` reads the committed protocol file; the other presets are ``PRESETS``.
    ``device``: where the world's models train and answer (``auto``: CUDA when present)."""
    if preset == "full" and PROTOCOL_FILE.is_file():
        proto, sha = load_protocol(PROTOCOL_FILE)
        proto = replace(proto, **overrides)
        return Evidence(proto, out, work, cache, progress, PROTOCOL_FILE.relative_to(
            PROTOCOL_FILE.parents[1]), None if overrides else sha, device).run()
    return Evidence(replace(PRESETS[preset], **overrides), out, work, cache, progress,
                    device=device).run()
