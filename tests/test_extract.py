"""End-to-end label extraction on the tiny models (in-process runner)."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from pipeline import shards
from pipeline.extract import RunMismatch, load_records, plan_run, run_local
from pipeline.stages import Labeler


def _table(out, name):
    return pq.read_table(out / name)


def test_labels_match_an_independent_brute_force(extract_cfg, tmp_path):
    cfg = extract_cfg()
    s = run_local(cfg)
    assert s["complete"] and s["images_labelled"] == 24 and s["images_failed"] == 0
    assert s["chunks"] == 3 and s["patches_per_image"] == 64
    out = tmp_path / "shards"
    manifest = json.loads((out / "manifest.json").read_text())
    assert [x["rows"] for x in manifest["shards"]] == [10, 10, 4]
    assert manifest["metadata"]["mode"] == "sea" and manifest["metadata"]["score_sign"] == -1
    # the summary's kept-labels figure equals a count over the written shards
    all_ids = np.concatenate([np.asarray(_table(out, x["name"]).column("label_ids").to_pylist())
                              for x in manifest["shards"]])
    assert s["kept_labels_per_patch"] == pytest.approx(
        (all_ids != shards.SENTINEL).sum() / (all_ids.size / 10), abs=1e-3)
    # input order kept across shards
    ids = sum((_table(out, x["name"]).column("image_id").to_pylist() for x in manifest["shards"]), [])
    assert ids == [r.image_id for r in load_records(cfg)]

    # recompute image 0 by hand: open_clip transform, raw tokens, numpy top-n of -cos
    lab = Labeler(cfg, progress=False)
    rec = load_records(cfg)[0]
    img = Image.open(f"{cfg.input.image_root}/{rec.path}").convert("RGB")
    with torch.no_grad():
        v = lab.visual
        v.output_tokens = True
        _, tokens = v(lab.preprocess(img)[None])
        v.output_tokens = False
    feats = (tokens @ v.proj)[0].double().numpy()
    feats /= np.linalg.norm(feats, axis=1, keepdims=True)
    cos = feats @ lab.text.double().numpy().T
    want_ids = np.argsort(cos, axis=1)[:, :10]  # -cos ranking
    row = _table(out, shards.shard_name(0)).slice(0, 1)
    got_ids = np.asarray(row.column("label_ids")[0].as_py()).reshape(64, 10)
    got_sc = np.asarray(row.column("scores")[0].as_py(), np.float32).reshape(64, 10)
    kept = got_ids != shards.SENTINEL
    np.testing.assert_array_equal(got_ids[kept], want_ids[kept])
    want_sc = -np.take_along_axis(cos, want_ids, axis=1)
    np.testing.assert_allclose(got_sc[kept], want_sc[kept], atol=2e-3)  # float16 storage
    assert (want_sc[~kept] < 0).all() and (got_sc[kept] >= 0).all()


def test_rerun_is_deterministic_and_resumes_only_missing(extract_cfg, tmp_path):
    a = tmp_path / "a"
    b = tmp_path / "b"
    run_local(extract_cfg(out=a))
    run_local(extract_cfg(out=b))
    for i in range(3):
        assert _table(a, shards.shard_name(i)).equals(_table(b, shards.shard_name(i)))
        assert shards.read_metadata(a / shards.shard_name(i)) == shards.read_metadata(b / shards.shard_name(i))
    # lose chunk 1 (and leave a half-written temp file): the rerun plans only chunk 1
    (b / shards.shard_name(1)).unlink()
    (b / shards.done_name(1)).unlink()
    (b / ".shard-000001.parquet.tmp999").write_bytes(b"partial")
    cfg = extract_cfg(out=b)
    lab = Labeler(cfg, progress=False)
    from pipeline.extract import load_records

    assert plan_run(cfg, lab.metadata(), load_records(cfg)).todo == [1]
    s = run_local(cfg, labeler=lab)
    assert s["images_processed_this_run"] == 10 and s["complete"]
    assert not list(b.glob(".shard-*"))
    for i in range(3):
        assert _table(a, shards.shard_name(i)).equals(_table(b, shards.shard_name(i)))
    assert (a / "manifest.json").read_text() == (b / "manifest.json").read_text()


def test_other_config_in_same_output_is_refused(extract_cfg, tmp_path):
    out = tmp_path / "o"
    run_local(extract_cfg(out=out))
    with pytest.raises(RunMismatch, match=r"'top_n' was 10, now 5"):
        run_local(extract_cfg("labels.top_n=5", out=out))
    s = run_local(extract_cfg("labels.top_n=5", "run.overwrite=true", out=out))
    assert s["complete"] and shards.read_metadata(out / shards.shard_name(0))["top_n"] == 5
    assert len(_table(out, shards.shard_name(0)).column("label_ids")[0]) == 64 * 5


def _odd_images(root):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 60, 3), dtype=np.uint8)
    Image.fromarray(rgb[..., 0], "L").save(root / "gray.png")
    Image.fromarray(np.dstack([rgb, rgb[..., :1]]), "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    Image.fromarray((rng.integers(0, 65535, (40, 60))).astype(np.uint16)).save(root / "gray16.png")
    p = Image.fromarray(rgb).convert("P")
    p.info["transparency"] = 0
    p.save(root / "palette.png", transparency=0)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees
    Image.fromarray(rgb).save(root / "rotated.jpg", exif=exif)


def test_odd_modes_are_labelled(extract_cfg, tmp_path):
    from pipeline.data import load_rgb

    root = tmp_path / "odd"
    root.mkdir()
    _odd_images(root)
    assert Image.open(root / "gray16.png").mode in ("I;16", "I")
    for f in root.iterdir():
        img = load_rgb(f, 10**8)
        assert img.mode == "RGB", f
    assert load_rgb(root / "rotated.jpg", 10**8).size == (40, 60)  # EXIF applied
    g16 = np.asarray(load_rgb(root / "gray16.png", 10**8))
    assert 40 < g16.mean() < 215  # rescaled, not clipped to white
    s = run_local(extract_cfg("input.json=null", f"input.image_root={root}", out=tmp_path / "s"))
    assert s["images_labelled"] == 6 and s["images_failed"] == 0


def test_bad_images_are_recorded_and_skipped(extract_cfg, bad_corpus, tmp_path):
    bad_json, root, expected = bad_corpus
    cfg = extract_cfg(f"input.json={bad_json}", f"input.image_root={root}",
                      "input.max_pixels=1000000", out=tmp_path / "s")
    s = run_local(cfg)
    check_bad_corpus(s, tmp_path / "s", expected)


def check_bad_corpus(summary, out, expected):
    assert summary["complete"] and summary["images_labelled"] == 5
    assert summary["images_failed"] == len(expected)
    errors = [json.loads(line) for line in (out / "errors.jsonl").read_text().splitlines()]
    reasons = {e["path"]: e["reason"] for e in errors}
    assert set(reasons) == set(expected)
    for path, want in expected.items():
        assert want in reasons[path], (path, reasons[path])
    labelled = sum(rb.num_rows for rb in shards.iter_label_set(out))
    assert labelled == 5


@pytest.mark.parametrize("mode", ["vanilla", "surgery"])
def test_other_modes_run_end_to_end(extract_cfg, tmp_path, mode):
    s = run_local(extract_cfg(f"labels.mode={mode}", "input.limit=6", out=tmp_path / mode))
    meta = shards.read_metadata(tmp_path / mode / shards.shard_name(0))
    assert s["images_labelled"] == 6 and meta["mode"] == mode and meta["score_sign"] == 1
    assert meta["dense_features"] == ("surgery" if mode == "surgery" else "raw")
    sc = np.asarray(_table(tmp_path / mode, shards.shard_name(0)).column("scores")[0].as_py())
    assert (sc >= 0).all()


def test_siglip_style_model_end_to_end(extract_cfg, tiny_siglip, tmp_path):
    s = run_local(extract_cfg("input.limit=6", model=tiny_siglip, out=tmp_path / "sig"))
    meta = shards.read_metadata(tmp_path / "sig" / shards.shard_name(0))
    assert s["images_labelled"] == 6 and meta["dense_features"] == "attnpool_value"
    assert meta["grid"] == [8, 8]


def test_cli_extract_and_missing_weights(extract_cfg, tmp_path, capsys):
    from pipeline.__main__ import main

    cfg = extract_cfg(out=tmp_path / "cli")
    rc = main(["extract", f"encoder.model={cfg.encoder.model}", "encoder.pretrained=null",
               f"input.json={cfg.input.json}", f"input.image_root={cfg.input.image_root}",
               f"run.output={tmp_path / 'cli'}", f"labels.text_cache_dir={cfg.labels.text_cache_dir}",
               "run.progress=false", "input.limit=3", "run.runner=local"])
    assert rc == 0 and json.loads(capsys.readouterr().out)["images_labelled"] == 3
    rc = main(["extract", "encoder.model=ViT-L-14-336", "encoder.pretrained=openai",
               f"encoder.cache_dir={tmp_path / 'nohf'}", f"input.json={cfg.input.json}",
               f"input.image_root={cfg.input.image_root}"])
    assert rc == 2 and "vit_large_patch14_clip_336" in capsys.readouterr().err


def test_timeline_separates_start_up_from_steady_state(extract_cfg, tmp_path):
    from pipeline.extract import timeline

    t = timeline(1.5, [(10, 2.0), (10, 4.0), (4, 5.0)])
    # after the first shard: 14 images between its end (2 s) and the last one's (5 s)
    assert t == {"startup_seconds": 1.5, "first_shard_seconds": 2.0,
                 "steady_images_per_second": round(14 / 3, 3)}
    assert timeline(0.5, [(10, 2.0)])["steady_images_per_second"] is None  # one chunk: no steady state
    assert timeline(0.5, [])["first_shard_seconds"] is None  # nothing to do (all chunks done)
    s = run_local(extract_cfg(out=tmp_path / "s"))  # 3 chunks
    assert s["steady_images_per_second"] > 0 and s["first_shard_seconds"] >= s["startup_seconds"]
    assert {"decode_wait_seconds", "write_seconds"} <= set(s)
