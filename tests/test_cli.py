"""Command-line habits (--print-config, --help-config, flag suggestions, eval-align's saved
config) and where metrics go (metrics.jsonl, TensorBoard, wandb offline)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from seacore.config import load_config, to_dict

REPO = Path(__file__).resolve().parents[1]


def _run(main, argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:
        rc = e.code
    out = capsys.readouterr()
    return rc, out.out, out.err


@pytest.mark.parametrize("cmd", ["pretrain", "finetune", "extract"])
def test_print_config_loads_back(cmd, tmp_path, capsys):
    from pipeline.__main__ import main as pipeline_main
    from pipeline.config import ExtractConfig
    from trainer.__main__ import main as trainer_main
    from trainer.config import FinetuneConfig, PretrainConfig

    main, cls, cfg_file, over = {
        "pretrain": (trainer_main, PretrainConfig, "configs/pretrain.yaml", "optim.lr=3e-4"),
        "finetune": (trainer_main, FinetuneConfig, "configs/finetune.yaml", "optim.vision_lr=2e-6"),
        "extract": (pipeline_main, ExtractConfig, "configs/extract.yaml", "labels.top_n=7"),
    }[cmd]
    rc, out, _ = _run(main, [cmd, "--config", str(REPO / cfg_file), over, "--print-config"], capsys)
    assert rc == 0
    (tmp_path / "printed.yaml").write_text(out)
    printed = load_config(cls, tmp_path / "printed.yaml")
    expected = load_config(cls, REPO / cfg_file, [over])
    assert to_dict(printed) == to_dict(expected)
    assert to_dict(printed) != to_dict(cls())  # the file and the override are in it


def test_help_config_honours_config_and_overrides(tmp_path, capsys):
    from trainer.__main__ import main

    (tmp_path / "c.yaml").write_text("optim:\n  lr: 0.0005\n")
    rc, out, _ = _run(main, ["pretrain", "--config", str(tmp_path / "c.yaml"), "sea.window=3",
                             "--help-config"], capsys)
    assert rc == 0
    lines = {line.split(" = ")[0]: line for line in out.splitlines()}
    assert lines["optim.lr"].startswith("optim.lr = 0.0005  (default 0.001)")
    assert lines["sea.window"].startswith("sea.window = 3  (default 2)")
    assert "(default" not in lines["optim.seed"]


@pytest.mark.parametrize("argv,expect", [
    (["pretrain", "--learning_rate", "2e-5"], "did you mean optim.lr=VALUE?"),
    (["finetune", "--learning_rate=2e-5"], "did you mean optim.lr=2e-5?"),
    (["finetune", "--per_device_train_batch_size=4"], "did you mean optim.micro_batch_size=4?"),
    (["pretrain", "--optim.lr=1e-3"], "config keys take no dashes; write optim.lr=1e-3"),
    (["pretrain", "--gradient_accumulation_steps=2"], "derived: optim.global_batch_size"),
    (["pretrain", "--warmup-ratio=0.1"], "did you mean optim.warmup_ratio=0.1?"),
])
def test_unknown_flag_names_the_key(argv, expect, capsys):
    from trainer.__main__ import main

    rc, _, err = _run(main, argv, capsys)
    assert rc == 2 and expect in err


def test_unknown_flag_and_key_in_the_pipeline(capsys):
    from pipeline.__main__ import main

    rc, _, err = _run(main, ["extract", "--top_n=5"], capsys)
    assert rc == 2 and "did you mean labels.top_n=5?" in err
    rc, _, err = _run(main, ["extract", "labels.topn=5"], capsys)
    assert rc == 2 and "did you mean 'labels.top_n'?" in err


def test_llava_flag_table_names_real_keys():
    """Every LLaVA flag that maps to a key maps to one that exists; the README lists them all."""
    from seacore.cli import keys
    from trainer.config import LLAVA_FLAGS, FinetuneConfig

    known = set(keys(FinetuneConfig))
    readme = (REPO / "docs" / "interop.md").read_text()  # the README links it
    for flag, target in LLAVA_FLAGS.items():
        if re.fullmatch(r"[a-z_]+(\.[a-z_]+)+|init_from", target):
            assert target in known, (flag, target)
        assert f"`--{flag}`" in readme, flag


def test_stage2_default_output_is_its_own():
    from trainer.config import FinetuneConfig, PretrainConfig

    assert PretrainConfig().log.output != FinetuneConfig().log.output


def test_eval_align_reads_the_runs_own_config(pretrain_cfg, tmp_path, capsys):
    """Given only the run, eval-align uses the config it was trained with (here nothing about
    the tiny models is on the command line: the defaults would name ViT-L and Vicuna)."""
    from trainer.__main__ import main
    from trainer.train import train

    cfg = pretrain_cfg("optim.max_steps=2", "log.save_every=1")
    train(cfg)
    rc, out, err = _run(main, ["eval-align", "--checkpoint", cfg.log.output], capsys)
    assert rc == 0, err
    result = json.loads(out)
    assert result["stage"] == "pretrain" and result["checkpoint"].endswith("step-00000002")
    assert result["align"]["images"] == 4


def test_metrics_go_to_jsonl_tensorboard_and_wandb_offline(pretrain_cfg, monkeypatch):
    """The same values through three sinks, each read back with its own reader."""
    pytest.importorskip("wandb")
    ea = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    from trainer.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    cfg = pretrain_cfg("optim.max_steps=4", "log.eval_every=2", "log.report_to=[tensorboard, wandb]")
    train(cfg)
    out = Path(cfg.log.output)
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    train_lines = [x for x in lines if x["kind"] == "train"]
    evals = [x for x in lines if x["kind"] == "eval"]
    assert [x["step"] for x in train_lines] == [1, 2, 3, 4]
    assert [x["step"] for x in evals] == [2, 4]  # the final evaluation once, not twice
    assert all(x["time"] > 1.7e9 for x in lines)
    acc = ea.EventAccumulator(str(out / "tensorboard"))
    acc.Reload()
    tb = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb] == [1, 2, 3, 4]
    assert [v for _, v in tb] == pytest.approx([x["loss"] for x in train_lines], rel=1e-6)
    runs = list((out / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    history = list(_wandb_history(runs[0]))
    logged = [(int(h["step"]), float(h["train/loss"])) for h in history if "train/loss" in h]
    assert logged == [(x["step"], pytest.approx(x["loss"], rel=1e-9)) for x in train_lines]
    assert [int(h["step"]) for h in history if "eval/images" in h] == [2, 4]


def _wandb_history(path: Path):
    """History rows of an offline ``.wandb`` file, read without wandb's code: the file is a
    LevelDB-style log (7-byte header, 32 KiB blocks, records of crc32/length/type + data, split
    across blocks as FIRST/MIDDLE/LAST) of wandb ``Record`` protobufs."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # block trailer
            pos += left
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunk = data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind == 0:
            break
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(buf)
            if rec.WhichOneof("record_type") == "history":
                yield {i.key or "/".join(i.nested_key): json.loads(i.value_json)
                       for i in rec.history.item}


def test_a_normal_stage2_run_warns_nothing(finetune_cfg, pretrain_cfg, tmp_path, capfd):
    """Quiet by default: stage 2 as configs/finetune.yaml runs it (gradient checkpointing,
    loader workers from the machine) raises no Python warning and prints no 'warn' line."""
    import warnings

    from trainer.train import train

    s1 = train(pretrain_cfg(f"log.output={tmp_path / 's1'}", "optim.max_steps=1"))
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        train(finetune_cfg(f"init_from={s1['final']}", "llm.gradient_checkpointing=true",
                           "data.num_workers=-1", "optim.max_steps=2"), "finetune")
    assert [f"{w.category.__name__}: {w.message}" for w in caught] == []
    err = capfd.readouterr().err.lower()
    assert not re.search(r"\bwarning\b|deprecat", err), err[-2000:]
