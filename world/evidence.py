"""``make evidence``: the ground-truth world's protocol, end to end.

1. Scenes: a training world and a held-out world (disjoint scene indices, same seed).
2. Models: the world's CLIP (image-caption pairs only) and a small LM (the world's text).
3. Label precision: the real extraction over the held-out scenes in every mode (``sea``,
   ``vanilla``, ``surgery`` with ``token`` and ``cls`` weights), against the full 2of12 list
   and the world's 28-word vocabulary, scored against the ground truth.
4. SEA's effect: stage 1 with lambda = 0 and 1 (``sampled``, and ``multi``) on the training
   scenes, labels made by the best mode of step 3 (highest top-1 precision on the full list,
   the criterion fixed in advance) and by the paper's default ``sea``, several seeds; then
   stage 2 on the world's instruction data from each stage-1 run. One exploratory arm
   (``tau_arm``: the temperature starting at 0.07), added after the first full run, is
   reported as such.
5. ``EVIDENCE.md``, ``results.json`` and figures.

The protocol (sizes, seeds, steps, metrics) is ``PRESETS``; it was fixed before any
lambda = 1 against lambda = 0 comparison was looked at and is not tuned toward a result.
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
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from tqdm.auto import tqdm

from wordlist import sha256_file
from world import metrics, scenes
from world.models import ClipSpec, LMSpec, spec_key, train_clip, train_lm, zero_shot

MODES = (("sea", "token"), ("vanilla", "token"), ("surgery", "token"), ("surgery", "cls"))


@dataclass
class Protocol:
    train_scenes: int = 3000  # the CLIP's and the LM's training scenes
    mllm_scenes: int = 2000  # the first of them: stage 1 and stage 2 data (as LLaVA's own sets)
    test_scenes: int = 300
    world_seed: int = 0
    clip: ClipSpec = field(default_factory=ClipSpec)
    lm: LMSpec = field(default_factory=LMSpec)
    seeds: tuple[int, ...] = (0, 1, 2)
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
    objectives_best: tuple[str, ...] = ("sampled", "multi")
    sea_default_arm: bool = True  # also train on the paper's default labels when they are not the best
    # exploratory, added after the first full run (L_a stayed at ln N with tau = 1 throughout
    # stage 1): one more lambda = 1 arm whose temperature starts at CLIP's 0.07; None: no such arm
    tau_arm: float | None = 0.07
    stage2: bool = True


PRESETS = {
    "full": Protocol(),
    "demo": Protocol(train_scenes=600, mllm_scenes=600, test_scenes=100, clip=ClipSpec(steps=250),
                     lm=LMSpec(steps=150), seeds=(0,), runner="local", stage1_epochs=3,
                     objectives_best=("sampled",), sea_default_arm=False, stage2=False,
                     holdout=48),
    "quick": Protocol(train_scenes=320, mllm_scenes=320, test_scenes=48, clip=ClipSpec(steps=60, batch_size=64),
                      lm=LMSpec(steps=60), seeds=(0,), stage1_epochs=1, tau_arm=None,
                      runner="local",  # the test suite's time: test_ray.py covers the Ray runner
                      stage2_epochs=1, objectives_best=("sampled",), holdout=32,
                      evals_per_run=2),
}


def _cache_root() -> Path:
    from pipeline.textemb import cache_root

    return cache_root() / "world"


class Evidence:
    def __init__(self, proto: Protocol, out: str | Path, work: str | Path | None = None,
                 cache: str | Path | None = None, progress: bool = True):
        self.p = proto
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
        self.clip, info = train_clip(self.train_dir, self.cache / f"clip-{spec_key(p.clip, key)}",
                                     p.clip, self._tick(bar))
        bar.close()
        self.results["clip"] = {"spec": asdict(p.clip), "final_loss": info["log"][-1]["loss"],
                                "train_seconds": info["seconds"],
                                "zero_shot": zero_shot(self.clip, self.test_dir)}
        from wordlist import load_wordlist

        words = list(load_wordlist().words)
        texts = scenes.world_text(self.train_dir)
        bar = self._bar("train LM", p.lm.steps)
        self.llm, info = train_lm(texts, words, self.cache / f"lm-{spec_key(p.lm, key)}", p.lm,
                                  self._tick(bar))
        bar.close()
        self.results["lm"] = {"spec": asdict(p.lm), "final_loss": info["log"][-1]["loss"],
                              "train_seconds": info["seconds"], "sentences": len(texts)}

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
        vocab_file = str(self.work / "vocab.txt")
        table = {}
        for mode in MODES:
            name = _mode_name(mode)
            for lst, wl, words in (("full", None, full), ("world", vocab_file, scenes.VOCAB)):
                shards = self.extract(self.test_dir, mode, wl, f"test-{name}-{lst}")
                table.setdefault(name, {})[lst] = metrics.label_precision(
                    shards, self.test_dir / "ground_truth.jsonl", words)
        self.results["label_precision"] = table
        best = max(table, key=lambda m: table[m]["full"]["top1_precision"]["value"])
        self.best_mode = next(m for m in MODES if _mode_name(m) == best)
        self.results["best_mode"] = best

    def arms(self) -> list[dict]:
        """The stage-1 settings compared: lambda 0, and lambda 1 per label mode / objective."""
        modes = [self.best_mode]
        if self.p.sea_default_arm and self.best_mode != ("sea", "token"):
            modes.append(("sea", "token"))
        arms = [{"name": "lambda=0", "weight": 0.0, "mode": self.best_mode, "objective": "sampled"}]
        for m in modes:
            objectives = self.p.objectives_best if m == self.best_mode else ("sampled",)
            for obj in objectives:
                arms.append({"name": f"lambda=1 {obj}, {_mode_name(m)} labels", "weight": 1.0,
                             "mode": m, "objective": obj})
        if self.p.tau_arm:
            arms.append({"name": f"lambda=1 sampled, {_mode_name(self.best_mode)} labels, "
                                 f"tau0={self.p.tau_arm:g}", "weight": 1.0, "mode": self.best_mode,
                         "objective": "sampled", "log_tau_init": math.log(self.p.tau_arm)})
        return arms

    def labels(self) -> None:
        """Every extraction, in one Ray session: the held-out scenes in each mode and list
        (label precision), then the training scenes in the modes the arms train on."""
        with self.ray_session():
            self.precision()
            self.train_labels = {}
            for arm in self.arms():
                m = arm["mode"]
                if m not in self.train_labels:
                    self.train_labels[m] = self.extract(self.train_dir, m, None,
                                                        f"train-{_mode_name(m)}", "captions-mllm.json")

    def sea_effect(self) -> None:
        """Every arm and seed; a run recorded in an earlier ``results.json`` with the same
        arm, seed and run settings (and whose folders are still there) is reused, so a killed
        or extended evidence run only trains what is missing."""
        old = {}
        prev = self.out / "results.json"
        if prev.is_file():
            for r in json.loads(prev.read_text()).get("runs", []):
                old[r.get("run_key")] = r
        runs, reused = [], 0
        for arm in self.arms():
            for seed in self.p.seeds:
                key = self._run_key(arm, seed)
                r = old.get(key)
                dirs = ("stage1_dir", "stage2_dir") if self.p.stage2 else ("stage1_dir",)
                if r is None or not all(Path(r.get(d, "")).is_dir() for d in dirs):
                    r = self._one_run(arm, seed)
                    r["run_key"] = key
                else:
                    reused += 1
                runs.append(r)
        self.results["reused_runs"] = reused
        self.results["runs"] = runs
        if self.p.stage2:
            mllm = {it["image"] for it in json.loads((self.train_dir / "instruct-mllm.json").read_text())}
            self.results["answer_chance"] = metrics.majority_baseline(  # what stage 2 saw
                [q for q in _questions(self.train_dir) if q["image"] in mllm], _questions(self.test_dir))

    def _run_key(self, arm: dict, seed: int) -> str:
        """What a run's outcome depends on: the arm, the seed, the run settings, the data
        and what its labels are a function of (encoder weights, mode, extraction settings)."""
        p = asdict(self.p)
        fields = {k: p[k] for k in ("mllm_scenes", "world_seed", "clip", "lm", "stage1_epochs",
                                    "stage1_lr", "stage2_epochs", "stage2_lr", "global_batch",
                                    "micro_batch", "holdout", "evals_per_run", "stage2", "top_n",
                                    "surgery_depth")}
        weights = Path(self.clip[len("local-dir:"):]) / "open_clip_model.safetensors"
        blob = json.dumps([arm, seed, fields, sha256_file(weights),
                           sha256_file(self.train_dir / "ground_truth.jsonl")], sort_keys=True, default=list)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]

    @functools.cache  # noqa: B019 (one Evidence per run; the held-out labels never change in it)
    def _test_labels(self, mode: tuple[str, str]) -> dict:
        return metrics.read_labels(self.work / "shards" / f"test-{_mode_name(mode)}-full")[1]

    def _one_run(self, arm: dict, seed: int) -> dict:
        from seacore.config import load_config
        from trainer.config import FinetuneConfig, PretrainConfig
        from trainer.train import build, train

        p = self.p
        tag = f"{arm['name'].replace(' ', '_').replace(',', '').replace('=', '')}-seed{seed}"
        labels = self.train_labels[arm["mode"]]
        per_epoch = (p.mllm_scenes - p.holdout) // p.global_batch
        common = [f"vision.model={self.clip}", "vision.pretrained=null", f"llm.path={self.llm}",
                  f"data.image_root={self.train_dir / 'images'}", "data.num_workers=0",
                  f"optim.global_batch_size={p.global_batch}", f"optim.micro_batch_size={p.micro_batch}",
                  f"optim.seed={seed}", "log.overwrite=true", f"log.progress={str(self.progress).lower()}",
                  "log.report_to=[]", "device=cpu"]
        s1 = load_config(PretrainConfig, None, common + [
            f"data.json={self.train_dir / 'captions-mllm.json'}", f"data.shards={labels}",
            f"data.holdout_images={p.holdout}", f"optim.epochs={p.stage1_epochs}",
            f"optim.lr={p.stage1_lr}", f"sea.weight={arm['weight']}", f"sea.objective={arm['objective']}",
            f"sea.log_tau_init={arm.get('log_tau_init', 0.0)}",
            f"log.eval_every={max(1, per_epoch * p.stage1_epochs // p.evals_per_run)}",
            "log.save_every=100000", f"log.output={self.work / 'runs' / ('s1-' + tag)}"])
        t = time.time()
        parts = build(s1, "pretrain")
        r1 = train(s1, "pretrain", parts=parts)
        run = {"arm": arm["name"], "mode": _mode_name(arm["mode"]), "weight": arm["weight"],
               "objective": arm["objective"], "seed": seed, "stage1_steps": r1["step"],
               "stage1_seconds": round(time.time() - t, 1), "stage1_dir": s1.log.output,
               "holdout_align": r1["align"]}
        run.update(self._stage1_measures(parts))
        del parts
        if not p.stage2:
            return run
        s2 = load_config(FinetuneConfig, None, common + [
            f"data.json={self.train_dir / 'instruct-mllm.json'}", f"optim.epochs={p.stage2_epochs}",
            f"optim.lr={p.stage2_lr}", f"init_from={s1.log.output}", "log.eval_every=0",
            "log.save_every=100000", f"log.output={self.work / 'runs' / ('s2-' + tag)}"])
        t = time.time()
        parts = build(s2, "finetune")
        r2 = train(s2, "finetune", parts=parts)
        run["stage2_steps"] = r2["step"]
        run["stage2_dir"] = s2.log.output
        run["stage2_seconds"] = round(time.time() - t, 1)
        parts.task.eval()
        rows = _questions(self.test_dir)
        answers = metrics.greedy_answers(parts.task.mllm, parts.tokenizer, parts.encoder.preprocess,
                                         self.test_dir, rows)
        run["answers"] = metrics.answer_accuracy(answers, rows)
        run["answer_examples"] = [{"question": r["question"], "answer": r["answer"], "given": a}
                                  for r, a in zip(rows[:12], answers[:12], strict=True)]
        return run

    def _stage1_measures(self, parts) -> dict:
        """Alignment against the truth, eval-align against each label set, caption loss: all
        on the held-out world."""
        from trainer.align_eval import evaluate_alignment

        mllm = parts.task.mllm
        mllm.eval()
        out = {"alignment_truth": metrics.alignment_truth(
            mllm, parts.word_tokens, parts.wordlist.words, self.test_dir, parts.encoder.preprocess,
            scenes.VOCAB)}
        for m in {self.best_mode, ("sea", "token")}:
            labels = self._test_labels(m)
            root = self.test_dir / "images"
            from PIL import Image

            rows = ({"pixel": parts.encoder.preprocess(Image.open(root / k).convert("RGB")),
                     "label_ids": labels[k][0].astype("int64")} for k in sorted(labels))
            out[f"eval_align_{_mode_name(m)}"] = evaluate_alignment(mllm, parts.word_tokens, rows,
                                                                    lambda r: r)
        out["caption_loss"] = metrics.caption_loss(mllm, parts.tokenizer, parts.encoder.preprocess,
                                                   self.test_dir)
        return out

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
        from world import report

        (self.out / "results.json").write_text(json.dumps(self.results, indent=1, default=str))
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
        from pipeline.ray_runner import init_ray
        from seacore.config import load_config

        started = init_ray(load_config(ExtractConfig, None, []))
        try:
            yield
        finally:
            if started:
                import ray

                ray.shutdown()

    def _bar(self, desc: str, total: int):
        return tqdm(total=total, desc=desc, unit="step", disable=not self.progress)

    @staticmethod
    def _tick(bar):
        def f(done, total, loss):
            bar.n = done
            bar.set_postfix(loss=f"{loss:.3f}", refresh=False)
            bar.refresh()
        return f


def _mode_name(mode: tuple[str, str]) -> str:
    return mode[0] if mode[0] != "surgery" else f"surgery-{mode[1]}"


def _questions(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "questions.jsonl").read_text().splitlines() if line]


def _jsonable(d):
    return json.loads(json.dumps(d, default=list))


def machine() -> dict:
    import os

    import torch

    return {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version(),
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def run_evidence(preset: str, out: str, work: str | None = None, cache: str | None = None,
                 progress: bool = True, **overrides) -> dict:
    proto = replace(PRESETS[preset], **overrides)
    return Evidence(proto, out, work, cache, progress).run()
