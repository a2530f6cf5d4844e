import pytest
import torch

from pipeline import dense
from pipeline.encoders import WeightsNotFound, load_encoder


def test_tiny_clip_builds_offline_with_expected_grid(tiny_clip):
    enc = load_encoder(tiny_clip)
    assert enc.grid == (8, 8) and enc.image_size == (64, 64)
    assert enc.weights_tag == "local-dir" and len(enc.weights_sha256) == 64
    assert dense.dense_kind(enc.model.visual, "sea") == "raw"
    x = torch.randn(2, 3, 64, 64)
    patches, glob = dense.patch_features(enc.model.visual, x, "raw")
    assert patches.shape == (2, 64, 32) and glob.shape == (2, 32)


def test_tiny_siglip_builds_offline_with_expected_grid(tiny_siglip):
    enc = load_encoder(tiny_siglip)
    visual = enc.model.visual
    assert enc.grid == (8, 8)
    assert getattr(visual.trunk, "cls_token", None) is None  # SigLIP layout: no class token
    assert dense.dense_kind(visual, "sea") == "attnpool_value"
    with pytest.raises(ValueError, match="surgery"):
        dense.dense_kind(visual, "surgery")
    patches, _ = dense.patch_features(visual, torch.randn(2, 3, 64, 64), "attnpool_value")
    assert patches.shape == (2, 64, 32)


def test_same_seed_same_weights(tmp_path, tiny_clip):
    from pipeline.tiny import save_tiny

    again = load_encoder(save_tiny("clip", tmp_path / "again", seed=0))
    assert again.weights_sha256 == load_encoder(tiny_clip).weights_sha256


def test_checkpoint_file_path_loads(tmp_path, tiny_clip):
    """The real path: a built-in architecture name plus a local checkpoint file."""
    import open_clip
    from safetensors.torch import save_file

    torch.manual_seed(0)
    m = open_clip.create_model("ViT-B-32")  # architecture from open_clip's own config, random
    ckpt = tmp_path / "vitb32.safetensors"
    save_file({k: v.contiguous() for k, v in m.state_dict().items()}, str(ckpt))
    enc = load_encoder("ViT-B-32", str(ckpt))
    assert enc.weights_tag == "file" and enc.grid == (7, 7)
    torch.testing.assert_close(enc.model.visual.proj, m.visual.proj)


def test_missing_weights_say_what_to_download(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HOME", str(tmp_path / "empty-hf"))
    with pytest.raises(WeightsNotFound) as e:
        load_encoder("ViT-L-14-336", "openai", cache_dir=str(tmp_path / "empty-hf"))
    msg = str(e.value)
    assert "timm/vit_large_patch14_clip_336.openai" in msg and "allow_download" in msg
    with pytest.raises(WeightsNotFound, match="neither a file nor a known tag"):
        load_encoder("ViT-L-14-336", "no-such-tag")


def test_pretrained_tag_loads_from_hf_cache_with_the_tags_settings(tiny_clip, tmp_path, monkeypatch):
    """The real tag path: tag -> Hugging Face cache file (no network) -> model built the way
    the tag's weights were trained (QuickGELU for OpenAI weights) with the tag's mean/std."""
    import json
    import shutil
    from pathlib import Path

    import open_clip
    from open_clip.transformer import QuickGELU

    src = Path(tiny_clip[len("local-dir:"):])
    cfg = json.loads((src / "open_clip_config.json").read_text())["model_cfg"]
    cfg_file = tmp_path / "sea-tiny-tagged.json"
    cfg_file.write_text(json.dumps(cfg))
    open_clip.add_model_config(cfg_file)
    snap = tmp_path / "hf" / "models--sea-test--tiny-tagged" / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text("abc123")
    shutil.copy(src / "open_clip_model.safetensors", snap / "open_clip_model.safetensors")
    tag_cfg = {"hf_hub": "sea-test/tiny-tagged/", "quick_gelu": True,
               "mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25)}
    real = open_clip.get_pretrained_cfg
    monkeypatch.setattr(open_clip, "get_pretrained_cfg",
                        lambda m, t: tag_cfg if (m, t) == ("sea-tiny-tagged", "faketag") else real(m, t))
    enc = load_encoder("sea-tiny-tagged", "faketag", cache_dir=str(tmp_path / "hf"))
    assert enc.weights_tag == "faketag" and enc.weights_sha256 == load_encoder(tiny_clip).weights_sha256
    assert isinstance(enc.model.visual.transformer.resblocks[0].mlp.gelu, QuickGELU)
    norm = [t for t in enc.preprocess.transforms if type(t).__name__ == "Normalize"][0]
    assert tuple(norm.mean) == (0.5, 0.5, 0.5) and tuple(norm.std) == (0.25, 0.25, 0.25)
    with pytest.raises(WeightsNotFound, match="sea-test/tiny-tagged"):
        load_encoder("sea-tiny-tagged", "faketag", cache_dir=str(tmp_path / "empty"))


def test_the_weight_resolver_carries_no_test_models():
    """Issue 36: the product's resolver does not import the tiny test models (it used to
    register the tiny SigLIP trunk on every load); only the tests register it."""
    import subprocess
    import sys

    code = ("import sys; from pipeline.encoders import resolve_checkpoint; "
            "resolve_checkpoint('local-dir:/nonexistent', None, False); "
            "resolve_checkpoint('ViT-B-32', None, False); "
            "print('pipeline.tiny' in sys.modules)")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.strip() == "False"
