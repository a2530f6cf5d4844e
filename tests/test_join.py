"""Issue 12, training side: one join key (the normalised image path) in both stages, a join
report at start-up, and a refusal instead of a run that trains on nothing."""

import json

import pytest

from pipeline.config import ExtractConfig
from pipeline.extract import run_local
from seacore.config import load_config
from trainer.train import build, train


@pytest.fixture(scope="module")
def folder_labels(tiny_clip, sample, text_cache, tmp_path_factory):
    """Labels made from the plain image folder: their ids are paths, not the JSON's ids."""
    _, root = sample
    out = tmp_path_factory.mktemp("folder-labels")
    run_local(load_config(ExtractConfig, None, [
        f"encoder.model={tiny_clip}", "encoder.pretrained=null", "input.json=null",
        f"input.image_root={root}", f"run.output={out}", "run.chunk_size=10",
        "run.row_group_size=4", f"labels.text_cache_dir={text_cache}", "run.progress=false"]))
    return out


def _dotted_json(sample, tmp_path, keep=None):
    """The sample JSON with './'-prefixed image paths (and optionally only some entries)."""
    js, _ = sample
    items = json.loads(js.read_text())
    items = items[:keep] if keep else items
    for it in items:
        it["image"] = "./" + it["image"]
    out = tmp_path / "dotted.json"
    out.write_text(json.dumps(items))
    return out, items


def test_folder_made_labels_join_a_json_in_stage_1(pretrain_cfg, folder_labels, sample, tmp_path):
    js, _ = _dotted_json(sample, tmp_path)
    cfg = pretrain_cfg(f"data.shards={folder_labels}", f"data.json={js}")
    p = build(cfg, "pretrain")
    rep = p.source.report
    assert rep["labelled_rows"] == 24 and rep["joined"] == 24 and rep["trainable"] == 24
    out = train(cfg, "pretrain", parts=p)
    assert out["samples"] == 20  # 24 labelled, 4 held out, all joined


def test_labels_join_stage_2_by_normalised_path(finetune_cfg, folder_labels, sample, tmp_path):
    js, items = _dotted_json(sample, tmp_path)
    cfg = finetune_cfg(f"data.json={js}", f"data.shards={folder_labels}", "sea.weight=1",
                       "data.holdout_images=0")
    p = build(cfg, "finetune")
    assert p.source.report["with_labels"] == len(items)
    rows = [r for b in p.source.blocks for r in p.source.rows(b)]
    assert all(r["label_ids"] is not None for r in rows)


def test_a_json_covering_half_the_labels_is_reported_and_batches_stay_full(pretrain_cfg, sample, tmp_path):
    js, _ = _dotted_json(sample, tmp_path, keep=12)
    cfg = pretrain_cfg(f"data.json={js}")
    p = build(cfg, "pretrain")
    rep = p.source.report
    assert rep["dropped"]["labelled image not in data.json"] == 12 and rep["trainable"] == 12
    out = train(cfg, "pretrain", parts=p)
    assert out["samples"] == 8 and out["step"] == 2  # (12 - 4 held out) / batch 4: full batches


def test_wrong_image_folder_is_refused_at_the_first_step(pretrain_cfg, tmp_path):
    """Images are not looked up at start-up (issue 35: it grew with the dataset): a wrong
    data.image_root is refused before the first step, naming the files and the key."""
    (tmp_path / "empty").mkdir()
    cfg = pretrain_cfg(f"data.image_root={tmp_path / 'empty'}", "data.holdout_images=0")
    with pytest.raises(ValueError, match=r"4 of 4 samples .* file not found.*data.image_root="):
        train(cfg, "pretrain")
    assert not (tmp_path / "run" / "final").exists()


def test_holdout_eating_the_set_is_refused_naming_the_key(pretrain_cfg):
    with pytest.raises(ValueError, match=r"data.holdout_images=22"):
        build(pretrain_cfg("data.holdout_images=22"), "pretrain")


def test_empty_or_broken_json_is_refused_naming_the_file(pretrain_cfg, tmp_path):
    from pipeline.data import InputError

    js = tmp_path / "empty.json"
    js.write_text("[]")
    with pytest.raises(InputError, match=f"data.json: {js}"):
        build(pretrain_cfg(f"data.json={js}"), "pretrain")


def test_fewer_row_groups_than_ranks_feed_every_rank(pretrain_cfg, label_run):
    """Ranks take strides of one global stream, not whole row groups: the test label set's
    6 row groups feed 8 ranks (such a run used to be refused, naming run.row_group_size)."""
    from trainer.data import StreamDataset

    p = build(pretrain_cfg(), "pretrain")
    assert len(p.source.blocks) < 8
    ranks = [StreamDataset(p.source, 1, 0, rank=r, world=8, holdout=4) for r in range(8)]
    rows = [[b["rows"] for b in ds] for ds in ranks]
    assert all(len(r) == ranks[0].steps_per_epoch() == 20 // 8 for r in rows)
    flat = sum(sum(rows, []), [])
    assert len(flat) == len(set(flat)) == 8 * (20 // 8)


def test_cli_refuses_a_run_with_no_data(pretrain_cfg, tmp_path, capsys):
    from trainer.__main__ import main

    cfg = pretrain_cfg()
    (tmp_path / "empty").mkdir()
    rc = main(["pretrain", f"vision.model={cfg.vision.model}", "vision.pretrained=null",
               f"llm.path={cfg.llm.path}", f"data.json={cfg.data.json}",
               f"data.image_root={tmp_path / 'empty'}", f"data.shards={cfg.data.shards}",
               "log.progress=false", "log.report_to=[]", f"log.output={tmp_path / 'r'}",
               "optim.global_batch_size=4", "optim.micro_batch_size=2", "data.holdout_images=0"])
    assert rc == 2 and "file not found" in capsys.readouterr().err
    assert not (tmp_path / "r" / "final").exists()


def test_trainer_errors_name_trainer_keys(pretrain_cfg, tmp_path):
    import torch

    from pipeline.encoders import WeightsNotFound
    from seacore.device import DeviceUnavailable
    from trainer.llm import LLMNotFound

    with pytest.raises(WeightsNotFound) as e:
        build(pretrain_cfg("vision.model=ViT-L-14-336", "vision.pretrained=openai",
                           f"vision.cache_dir={tmp_path / 'nohf'}"), "pretrain")
    assert "vision.pretrained" in str(e.value) and "encoder." not in str(e.value)
    with pytest.raises(LLMNotFound, match="filesystem path but not a folder") as e:
        build(pretrain_cfg(f"llm.path={tmp_path / 'no-such-llm'}"), "pretrain")
    assert "huggingface-cli download" not in str(e.value)
    if not torch.cuda.is_available():
        with pytest.raises(DeviceUnavailable, match="device=cuda, but this machine has no usable CUDA"):
            build(pretrain_cfg("device=cuda"), "pretrain")
