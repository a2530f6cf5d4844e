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
