"""configs/paper/: every config is what paper/rows.py says, parses, and builds and trains one
step with the models swapped for tiny stand-ins of the same kind (CLIP in transformers format,
SigLIP, S2 scales, Llama/Gemma/Phi-3 LLMs), so a wrong key or shape fails here, not after hours
on a cluster."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from paper import configs as C
from paper import rows as R

REPO = Path(__file__).resolve().parents[1]
PAPER = REPO / "configs" / "paper"


def test_committed_configs_are_the_rows():
    files = C.files()
    on_disk = {str(p.relative_to(PAPER)) for p in PAPER.rglob("*.yaml")}
    assert on_disk == set(files), "run `python -m paper write`"
    for rel, cfg in files.items():
        assert (PAPER / rel).read_text() == C.render(cfg), rel


def test_every_config_parses():
    from pipeline.config import ExtractConfig
    from seacore.config import load_config
    from trainer.config import FinetuneConfig, PretrainConfig

    for rel in C.files():
        cls = (ExtractConfig if rel.startswith("extract-") else
               PretrainConfig if rel.endswith("-pretrain.yaml") else FinetuneConfig)
        load_config(cls, PAPER / rel)


def test_readme_has_the_row_table():
    assert C.table() in (REPO / "docs" / "paper.md").read_text()  # the README links it


def test_rows_follow_the_paper():
    for row in R.ROWS.values():
        for arm in row.arms:
            pre = C.pretrain(row, arm)
            ft = C.finetune(row, arm)
            assert pre["sea"]["weight"] == (1.0 if arm.sea else 0.0) and pre["sea"]["window"] == 2
            assert (pre["optim"]["lr"], pre["optim"]["global_batch_size"]) == (1e-3, 256)
            assert (ft["optim"]["lr"], ft["optim"]["global_batch_size"]) == (2e-5, 128)
            assert ft["init_from"].startswith(C.run_dir(row, arm.pretrain_from or arm.name, "pretrain"))
        assert C.extract(row)["labels"]["top_n"] == 10
    assert R.ROWS["t3-finetune-ve-vicuna7b"].arms[1].vision_lr == 2e-6
    assert R.ROWS["t2-s2-clip-l-1008-vicuna7b"].s2_scales == [336, 672, 1008]


def test_run_plan_skips_what_is_done_and_resumes_the_rest(tmp_path, monkeypatch, capsys):
    from paper.__main__ import main, plan

    monkeypatch.chdir(tmp_path)
    row = R.ROWS["t2-clip-l-336-vicuna7b"]
    steps = plan(row, data_root="/datasets", nproc=8)
    assert [s.name for s in steps] == ["labels", "llava: stage 1", "llava: stage 2",
                                       "llava: export (hf-llava)", "sea: stage 1", "sea: stage 2",
                                       "sea: export (hf-llava)"]
    assert "input.json=/datasets/LLaVA-Pretrain/blip_laion_cc_sbu_558k.json" in steps[0].cmd
    assert all("resume=latest" in s.cmd for s in steps if "stage" in s.name)
    assert steps[1].cmd[1:5] == ["-m", "torch.distributed.run", "--nproc-per-node", "8"]
    (tmp_path / C.shards_dir(row)).mkdir(parents=True)
    (tmp_path / C.shards_dir(row) / "manifest.json").write_text("{}")
    assert main(["run", row.name, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "# labels: done" in out and "-m trainer pretrain" in out
    siglip = plan(R.ROWS["t2-siglip-so400m-384-vicuna7b"])
    assert "cannot hold open_clip's SigLIP" in siglip[3].note


# --- one training step per kind of config, with tiny stand-ins ------------------------------


@pytest.fixture(scope="module")
def standins(workdir, tiny_siglip, sample):
    """Tiny models of each kind, and label runs made by each paper extraction config."""
    from pipeline.config import ExtractConfig
    from pipeline.extract import run_local
    from pipeline.tiny import save_tiny_hf_clip
    from seacore.config import load_config
    from trainer.tiny import save_tiny_llm
    from world.sample import sample_text

    words = ["red", "blue", "cube", "sphere", "grass", "sky", "a", "the", "on", "of"]
    llms = {arch: save_tiny_llm(workdir / f"paper-llm-{arch}", words, arch=arch, hidden=32,
                                layers=1, heads=2, extra_text=sample_text())
            for arch in ("llama", "gemma", "phi3")}
    towers = {"clip-l-336": save_tiny_hf_clip(workdir / "paper-hf-clip"), "siglip-so400m-384": tiny_siglip}
    js, root = sample
    labels = {}
    for rel in sorted({r.extract_config for r in R.ROWS.values()}):
        row = next(r for r in R.ROWS.values() if r.extract_config == rel)
        out = workdir / "paper-labels" / rel
        run_local(load_config(ExtractConfig, PAPER / rel, [
            f"encoder.model={towers[row.tower]}", "encoder.pretrained=null", f"input.json={js}",
            f"input.image_root={root}", "input.limit=8", f"run.output={out}", "run.progress=false",
            f"labels.text_cache_dir={workdir / 'text-cache'}", "run.runner=local"]))
        labels[rel] = out
    return llms, towers, labels


def _arch(llm_id: str) -> str:
    return "gemma" if "gemma" in llm_id else "phi3" if "Phi-3" in llm_id else "llama"


def _kinds():
    """One config file per kind: stage, tower, S2, LLM family, SEA on/off, tower tuned."""
    seen = {}
    for rel, cfg in C.files().items():
        if rel.startswith("extract-"):
            continue
        stage = "pretrain" if rel.endswith("-pretrain.yaml") else "finetune"
        key = (stage, cfg["vision"]["model"], tuple(cfg["vision"]["s2_scales"]),
               _arch(cfg["llm"]["path"]), cfg["sea"]["weight"] > 0,
               cfg["optim"].get("vision_lr", 0) > 0)
        seen.setdefault(key, rel)
    return sorted(seen.values())


@pytest.mark.parametrize("rel", _kinds())
def test_each_kind_of_config_trains_a_step(rel, standins, sample, instruct_json, tmp_path):
    from seacore.config import load_config
    from trainer.config import FinetuneConfig, PretrainConfig
    from trainer.train import build, train_step

    llms, towers, labels = standins
    row = R.ROWS[rel.split("/")[0]]
    stage = "pretrain" if rel.endswith("-pretrain.yaml") else "finetune"
    raw = yaml.safe_load((PAPER / rel).read_text())
    js, root = sample
    base = 64 if row.tower.startswith("siglip") else 32  # the stand-ins' image sizes
    over = [f"vision.model={towers[row.tower]}", "vision.pretrained=null",
            f"llm.path={llms[_arch(raw['llm']['path'])]}", f"data.image_root={root}",
            "data.num_workers=0", "optim.global_batch_size=4", "optim.micro_batch_size=2",
            "optim.max_steps=1", "log.report_to=[]", "log.progress=false",
            f"log.output={tmp_path / 'run'}",
            # one process here: FSDP needs a process group (tests/test_finetune.py runs it)
            "dist.strategy=ddp"]
    if row.s2_scales:  # the same ratios on the stand-in's size
        over.append(f"vision.s2_scales={[s * base // row.s2_scales[0] for s in row.s2_scales]}")
    if stage == "pretrain":
        over += [f"data.json={js}", f"data.shards={labels[row.extract_config]}",
                 "data.holdout_images=2", "data.shuffle_window=2"]
        cfg = load_config(PretrainConfig, PAPER / rel, over)
    else:
        over += [f"data.json={instruct_json}", "init_from=null", "data.shuffle_block=4",
                 "data.shuffle_window=2"]
        cfg = load_config(FinetuneConfig, PAPER / rel, over)
    p = build(cfg, stage)
    assert p.task.mllm.adapter[0].in_features == p.task.mllm.vision.width
    p.dataset.set_position(0, 0)
    it = iter(p.dataset)
    metrics = train_step(p, [next(it) for _ in range(p.accum)], 0)
    assert metrics["loss"] == metrics["loss"]  # finite, not NaN
    if cfg.sea.weight > 0:
        assert metrics["pairs"] > 0 and metrics["align_loss"] > 0
    if getattr(cfg.optim, "vision_lr", 0) > 0:
        assert len(p.optimizer.param_groups) == 2
