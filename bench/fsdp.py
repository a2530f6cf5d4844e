"""Training at the paper's scale, measured on CPU (gloo): a random Llama of about 1B parameters
(2048 wide, 18 layers, MLP 5504: Llama-7B's proportions; the tiny tokenizer's vocabulary)
behind the demo's tiny CLIP.

- ``memory``: stage 2 (the LLM trains, AdamW, fp32) on 1 process and on 2 FSDP ranks: each
  rank's peak resident memory while loading (``build``) and while stepping (two optimizer
  steps: the second has Adam's moments), and each rank's checkpoint bytes and seconds.
- ``sea_overhead``: stage 1 step time with lambda = 1 over lambda = 0, paired round by round on
  one model (the SEA weight toggled between steps), where the LM dominates the step.

Each measurement runs in its own processes (``python bench/fsdp.py worker ...``, under torchrun
for 2 ranks) so that peaks are the run's alone; a rank reads its own ``VmHWM`` from
``/proc/self/status`` (Linux), reset with ``clear_refs`` between load and steps; the load
peak is taken after every weight was read once (transformers maps safetensors lazily).
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

# Llama's own proportions (Vicuna-7B: 4096 wide, MLP 11008 = 2.6875x), at about 1B parameters
SHAPE = {"hidden": 2048, "layers": 18, "heads": 16, "intermediate": 5504}


def _status(key: str) -> float:
    """MiB of a /proc/self/status field (VmHWM: peak resident, VmRSS: now)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) / 1024
    raise KeyError(key)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS (Linux >= 4.0)


def _config(work: Path, stage: str, out: Path, *extra: str):
    from seacore.config import load_config
    from trainer.config import FinetuneConfig, PretrainConfig

    cls = PretrainConfig if stage == "pretrain" else FinetuneConfig
    return load_config(cls, None, [
        f"vision.model=local-dir:{work / 'models' / 'tiny-clip'}", "vision.pretrained=null",
        f"llm.path={work / 'models' / 'llm-1b'}", f"data.json={work / 'sample' / 'sample.json'}",
        f"data.image_root={work / 'sample' / 'images'}", f"data.shards={work / 'shards'}",
        "data.holdout_images=8", "data.num_workers=0", "optim.global_batch_size=2",
        "optim.micro_batch_size=1", "optim.epochs=1", "optim.lr=1e-5", "log.eval_every=0",
        "log.save_every=1000", "log.progress=false", "log.report_to=[]",
        "dist.strategy=fsdp", f"log.output={out}", *extra])


def worker(kind: str, work: Path, result: Path) -> None:
    """One measurement, in this process (one rank of it under torchrun)."""
    import torch

    from trainer.manager import TrainState
    from trainer.train import build, train_step

    torch.manual_seed(0)
    if kind == "memory":
        world = int(os.environ.get("WORLD_SIZE", 1))
        import open_clip  # noqa: F401  (in the base: what every process imports anyway)
        import transformers  # noqa: F401

        base = _status("VmRSS")  # the interpreter and its libraries, before any model
        p = build(_config(work, "finetune", work / "runs" / f"mem-{world}"), "finetune")
        # every weight read once: from_pretrained maps the safetensors lazily, so an untouched
        # weight would count only at the first forward
        with torch.no_grad():
            for q in p.task.parameters():
                (q.to_local() if hasattr(q, "to_local") else q).sum()
        load_peak = _status("VmHWM")
        p.task.train()
        p.dataset.set_position(0, 0)
        batches = list(p.dataset)[: 2 * p.accum]
        _reset_peak()
        steps = []
        for s in range(2):
            t = time.perf_counter()
            train_step(p, batches[s * p.accum:(s + 1) * p.accum], s)
            steps.append(time.perf_counter() - t)
        step_peak = _status("VmHWM")
        t = time.perf_counter()
        path = p.ckpt.save(TrainState(step=2, steps_in_epoch=2, samples=4))
        save_s = time.perf_counter() - t
        from trainer import distributed as D

        mine = (path / "shards").glob(f"shard-{p.dist.rank + 1:05d}-*")  # this rank's files
        me = {"base_mib": base, "load_peak_mib": load_peak, "step_peak_mib": step_peak, "step_s": steps,
              "ckpt_bytes": sum(f.stat().st_size for f in mine), "ckpt_save_s": save_s,
              "params": sum(q.numel() for q in p.task.mllm.llm.parameters())}
        ranks = D.gather_objects(me, p.dist)
        if p.dist.is_main():
            result.write_text(json.dumps(ranks))
        D.barrier(p.dist)
        D.close()
        return
    # sea_overhead: one model, the SEA weight toggled between paired steps
    p = build(_config(work, "pretrain", work / "runs" / "overhead", "sea.weight=1",
                      "optim.global_batch_size=4", "optim.micro_batch_size=2"), "pretrain")
    p.task.train()
    p.dataset.set_position(0, 0)
    batches = list(p.dataset)[: p.accum]
    for w in (0.0, 1.0):  # warm-up
        p.task.weight = w
        train_step(p, batches, 0)
    times = {0.0: [], 1.0: []}
    for r in range(int(os.environ.get("SEA_BENCH_ROUNDS", 16))):
        for w in ((0.0, 1.0) if r % 2 == 0 else (1.0, 0.0)):
            p.task.weight = w
            t = time.perf_counter()
            train_step(p, batches, 1)
            times[w].append(time.perf_counter() - t)
    result.write_text(json.dumps({"lambda0_s": times[0.0], "lambda1_s": times[1.0]}))


def _prepare(work: Path) -> None:
    """The tiny CLIP, the demo's sample and its labels, and the 1B Llama on disk."""
    from pipeline.extract import run_local
    from pipeline.tiny import save_tiny
    from trainer.tiny import save_tiny_llm
    from wordlist import load_wordlist
    from world.sample import extract_config, make_sample, sample_text

    spec = save_tiny("clip", work / "models" / "tiny-clip")
    make_sample(work / "sample", n=24)
    run_local(extract_config(work, spec))
    save_tiny_llm(work / "models" / "llm-1b", list(load_wordlist().words), extra_text=sample_text(),
                  **SHAPE)


def _launch(kind: str, work: Path, nproc: int) -> list | dict:
    result = work / f"{kind}-{nproc}.json"
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, (os.cpu_count() or 2) // nproc)))
    head = ([sys.executable] if nproc == 1 else
            [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"])
    subprocess.run([*head, str(Path(__file__)), "worker", kind, str(work), str(result)], check=True,
                   cwd=REPO, env=env)
    return json.loads(result.read_text())


def bench_fsdp(work: Path, res: dict, median_ci) -> None:
    """``res['memory']`` gains the FSDP figures, ``res['training']`` the 1B SEA overhead
    (``median_ci``: bench.py's interval of a median)."""
    import shutil

    _prepare(work)
    one = _launch("memory", work, 1)[0]
    shutil.rmtree(work / "runs", ignore_errors=True)  # 11 GB of checkpoint
    two = _launch("memory", work, 2)
    shutil.rmtree(work / "runs", ignore_errors=True)
    mem = res.setdefault("memory", {})
    # the worst rank against the one process
    mem["fsdp_load_peak_ratio"] = max(r["load_peak_mib"] for r in two) / one["load_peak_mib"]
    mem["fsdp_step_peak_ratio"] = max(r["step_peak_mib"] for r in two) / one["step_peak_mib"]
    over = _launch("sea_overhead", work, 1)
    ratios = [a / b for a, b in zip(over["lambda1_s"], over["lambda0_s"], strict=True)]
    res.setdefault("training", {})["sea_overhead_ratio_1b"] = median_ci(ratios)
    res["fsdp"] = {
        "config": (f"stage 2, random Llama {SHAPE['hidden']} wide x {SHAPE['layers']} layers, MLP "
                   f"{SHAPE['intermediate']} "
                   f"({one['params'] / 1e9:.2f}B parameters, fp32, AdamW), tiny CLIP (64 visual "
                   f"tokens), micro-batch 1, global batch 2, CPU, gloo"),
        "params": one["params"], "one_rank": one, "two_ranks": two,
        "overhead_step_s": {"lambda0": statistics.median(over["lambda0_s"]),
                            "lambda1": statistics.median(over["lambda1_s"])}}


if __name__ == "__main__":
    if sys.argv[1] == "worker":
        worker(sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4]))
    else:  # python bench/fsdp.py: these figures alone, printed
        import shutil
        import tempfile

        from bench import median_ci

        work = Path(tempfile.mkdtemp(prefix="sea-bench-fsdp-"))
        res: dict = {}
        try:
            bench_fsdp(work, res, median_ci)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        print(json.dumps(res, indent=1))
