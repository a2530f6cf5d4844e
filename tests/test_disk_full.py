"""A full disk ends extraction and training with one line naming the folder, not a traceback."""

from __future__ import annotations

import errno

from test_finetune import _as_args as _args


def _enospc(*_a, **_k):
    raise OSError(errno.ENOSPC, "No space left on device")


def test_extraction_on_a_full_disk_says_so_in_one_line(extract_cfg, monkeypatch, capsys, tmp_path):
    import pipeline.shards
    from pipeline.__main__ import main

    out = tmp_path / "shards"
    cfg = extract_cfg("run.runner=local", out=out)
    monkeypatch.setattr(pipeline.shards.ShardWriter, "write", _enospc)
    assert main(["extract", *_args(cfg)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and f"run.output {out}" in err[0] and "no space left" in err[0]


def test_training_on_a_full_disk_says_so_in_one_line(pretrain_cfg, monkeypatch, capsys, tmp_path):
    import trainer.checkpoint
    from trainer.__main__ import main

    out = tmp_path / "run"
    cfg = pretrain_cfg(f"log.output={out}", "optim.max_steps=1")
    monkeypatch.setattr(trainer.checkpoint, "save", _enospc)
    assert main(["pretrain", *_args(cfg)]) == 2
    err = [ln for ln in capsys.readouterr().err.strip().splitlines() if ln.startswith("error")]
    assert len(err) == 1 and f"log.output {out}" in err[0] and "no space left" in err[0]
