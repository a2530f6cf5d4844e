"""Quiet by default: loading an LM prints no transformers progress bar, building a random model
on purpose logs no open_clip warning, the shipped configs take the loader workers from the
machine (a fixed 4 makes PyTorch warn on a 2-core machine)."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import yaml

REPO = Path(__file__).resolve().parents[1]


def test_loading_an_llm_prints_no_progress_bar(tiny_llm, capfd):
    from transformers.utils import logging as tf_logging

    from trainer.llm import load_llm

    capfd.readouterr()
    load_llm(tiny_llm, "float32", torch.device("cpu"))
    err = capfd.readouterr().err
    assert "Loading weights" not in err and "it/s" not in err, err[-1000:]
    assert tf_logging.is_progress_bar_enabled()  # restored for the caller's own loads


def test_building_a_random_clip_logs_no_warning(tmp_path, caplog):
    from pipeline.tiny import save_tiny

    with caplog.at_level(logging.WARNING):
        save_tiny("clip", tmp_path / "c")
    assert not [r for r in caplog.records if "No pretrained weights" in r.getMessage()]


def test_shipped_configs_take_loader_workers_from_the_machine():
    for name in ("pretrain.yaml", "finetune.yaml"):
        cfg = yaml.safe_load((REPO / "configs" / name).read_text())
        assert cfg["data"]["num_workers"] == -1, name
