"""Reading a label run as words (``pipeline show`` / ``stats`` and their library), checked
against a plain pyarrow read of the shards and the word-list file."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from pipeline import shards
from pipeline.labelset import LabelSet, find_wordlist, statistics


def _cli(*args):
    """``python -m pipeline ARGS`` in-process (the same main()): (rc, stdout, stderr)."""
    import contextlib
    import io

    from pipeline.__main__ import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main(list(args))
    return rc, out.getvalue(), err.getvalue()


def _reference(label_run):
    """Every row of every shard, read with pyarrow alone, and the 2of12 words."""
    rows = []
    for p in sorted(Path(label_run).glob("shard-*.parquet")):
        rows += pq.read_table(p).to_pylist()
    from wordlist import load_wordlist

    return rows, load_wordlist().words


def test_show_prints_the_top1_grid_and_a_patch(label_run):
    rows, words = _reference(label_run)
    row = rows[5]
    n = len(row["label_ids"]) // (row["grid_h"] * row["grid_w"])
    rc, out, err = _cli("show", "--shards", str(label_run), "--image", row["path"])
    assert rc == 0, err
    lines = out.splitlines()[1:]
    assert len(lines) == row["grid_h"]
    for i, line in enumerate(lines):
        want = [words[row["label_ids"][(i * row["grid_w"] + c) * n]] for c in range(row["grid_w"])]
        assert line.split() == want
    # the same image by id, one patch: its kept words and scores, best first
    rc, out, err = _cli("show", "--shards", str(label_run), "--image", row["image_id"], "--patch", "1,2")
    assert rc == 0, err
    p = 1 * row["grid_w"] + 2
    ids, sc = row["label_ids"][p * n:(p + 1) * n], row["scores"][p * n:(p + 1) * n]
    want = [(words[i], s) for i, s in zip(ids, sc, strict=True) if i != shards.SENTINEL]
    got = [line.split() for line in out.splitlines()[1:]]
    assert [g[0] for g in got] == [w for w, _ in want]
    assert [float(g[1]) for g in got] == pytest.approx([s for _, s in want], abs=1e-4)


def test_show_unknown_image_and_missing_wordlist(label_run, tmp_path):
    rc, _, err = _cli("show", "--shards", str(label_run), "--image", "no/such.jpg")
    assert rc == 2 and "no/such.jpg" in err
    meta = dict(shards.read_manifest(label_run)["metadata"], wordlist_sha256="0" * 64)
    with pytest.raises(Exception, match="0000000000000000.*--wordlist"):
        find_wordlist(meta)
    other = tmp_path / "words.txt"
    other.write_text("alpha\nbeta\n")
    with pytest.raises(Exception, match="words.txt: sha256"):
        find_wordlist(shards.read_manifest(label_run)["metadata"], other)


def test_stats_equal_a_direct_count(label_run, tmp_path):
    rows, words = _reference(label_run)
    st = statistics(LabelSet(label_run))
    ids = np.concatenate([np.array(r["label_ids"]) for r in rows])
    scores = np.concatenate([np.array(r["scores"], dtype=np.float32) for r in rows])
    n = st["top_n"]
    ids, scores = ids.reshape(-1, n), scores.reshape(-1, n)
    kept = ids != shards.SENTINEL
    assert st["images"] == len(rows) and st["patches"] == len(ids)
    assert st["labels"] == int(kept.sum())
    assert st["kept_per_patch_histogram"] == np.bincount(kept.sum(1), minlength=n + 1).tolist()
    used = set(ids[kept].tolist())
    assert st["words_used"] == len(used)
    assert st["share_of_wordlist_used"] == pytest.approx(len(used) / len(words))
    counts = np.bincount(ids[kept], minlength=len(words))
    top = st["top_words"][0]
    assert top["count"] == counts.max() and counts[words.index(top["word"])] == counts.max()
    assert sum(st["score"]["all_kept"]) == int(kept.sum())
    assert st["score"]["mean"] == pytest.approx(float(scores[kept].mean()), rel=1e-5)
    rc, _, err = _cli("stats", "--shards", str(label_run), "--out", str(tmp_path / "st"))
    assert rc == 0, err
    assert json.loads((tmp_path / "st" / "stats.json").read_text())["labels"] == st["labels"]
    for png in ("scores.png", "labels.png"):
        assert (tmp_path / "st" / png).stat().st_size > 5000


def test_a_run_with_its_own_word_list_opens_from_its_folder(extract_cfg, tmp_path, monkeypatch):
    """A run labelled against another list (the world's 28 words, a domain list) carries a
    copy: show / stats / gallery / report find it by hash without --wordlist."""
    from pipeline.extract import run_local
    from pipeline.labelset import LabelSet

    words = tmp_path / "mine.txt"
    words.write_text("red\ngreen\nblue\ncircle\nsquare\ntriangle\nsky\ngrass\n")
    out = tmp_path / "run"
    run_local(extract_cfg(f"labels.wordlist={words}", out=out))
    words.unlink()  # gone from where it was: the run must not need it
    monkeypatch.delenv("SEA_WORDLIST", raising=False)
    ls = LabelSet(out)
    assert ls.wordlist.words[:3] == ("red", "green", "blue")
    rc, out_text, err = _cli("stats", "--shards", str(out))
    assert rc == 0, err


def test_score_histogram_covers_surgery_scores(tmp_path):
    """Surgery scores pass 1 (2.1 on real runs): the histogram's range covers them instead of
    piling them into a spike at 1.0, and says what (nothing) fell outside."""
    from types import SimpleNamespace

    from pipeline.labelset import statistics

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 5, size=(4, 6, 3)).astype(np.uint16)
    scores = rng.uniform(0.1, 2.1, size=(4, 6, 3)).astype(np.float32)
    class Words(list):
        words = tuple("abcde")

    ls = SimpleNamespace(top_n=3, wordlist=Words("abcde"), dir=tmp_path, meta={"mode": "surgery"},
                         batches=lambda: iter([(None, ids, scores)]))
    st = statistics(ls)
    bins = np.array(st["score"]["bins"])
    assert bins[0] <= scores.min() and bins[-1] >= scores.max()
    assert st["score"]["clipped"] == {"below": 0, "above": 0}
    assert sum(st["score"]["all_kept"]) == scores.size
    top = np.histogram(scores[..., 0], bins)[0]
    assert st["score"]["top1"] == top.tolist()  # the same counts numpy gives on the raw scores
