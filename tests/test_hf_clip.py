"""``hf-clip:``: a transformers CLIPModel (the format LLaVA-1.5's tower is cached in) converted
to open_clip on load gives transformers' own image and text embeddings and hidden states."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.tiny import save_tiny_hf_clip

transformers = pytest.importorskip("transformers")


def _features(out):
    return out if isinstance(out, torch.Tensor) else out.pooler_output


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("hfclip") / "clip-tiny"
    save_tiny_hf_clip(folder)
    return folder


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_converted_tower_equals_transformers_forward(tmp_path, act):
    from transformers import CLIPModel

    from pipeline import dense
    from pipeline.encoders import load_encoder
    from trainer.model import VisionTower

    save_tiny_hf_clip(tmp_path / "m", act)
    hf = CLIPModel.from_pretrained(tmp_path / "m").eval()
    enc = load_encoder(f"hf-clip:{tmp_path / 'm'}")
    oc = enc.model
    torch.manual_seed(1)
    x = torch.randn(2, 3, 32, 32)
    tokens = enc.tokenizer(["a red cube", "grass"])
    with torch.no_grad():
        img_hf = _features(hf.get_image_features(pixel_values=x))
        txt_hf = _features(hf.get_text_features(input_ids=tokens))
        hidden = hf.vision_model(pixel_values=x, output_hidden_states=True).hidden_states
        torch.testing.assert_close(oc.encode_image(x), img_hf, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(oc.encode_text(tokens), txt_hf, atol=1e-5, rtol=1e-5)
        # LLaVA's features: hidden_states[-2] without the class token
        torch.testing.assert_close(VisionTower(oc.visual, -2)(x), hidden[-2][:, 1:],
                                   atol=1e-5, rtol=1e-5)
        for n in range(1, 4):
            torch.testing.assert_close(dense.clip_hidden(oc.visual, x, n), hidden[n],
                                       atol=1e-5, rtol=1e-5)
    assert enc.grid == (4, 4) and enc.image_size == (32, 32)
    assert enc.name == "hf-clip:m" and len(enc.weights_sha256) == 64
    assert type(oc.visual.transformer.resblocks[0].mlp.gelu).__name__ == (
        "QuickGELU" if act == "quick_gelu" else "GELU")


def test_preprocess_equals_clip_image_processor(hf_folder):
    from PIL import Image
    from transformers import CLIPImageProcessor

    from pipeline.encoders import load_encoder

    enc = load_encoder(f"hf-clip:{hf_folder}")
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 255, (45, 70, 3), dtype=np.uint8))
    ours = enc.preprocess(img)
    theirs = CLIPImageProcessor.from_pretrained(hf_folder)(img, return_tensors="pt")["pixel_values"][0]
    assert ours.shape == theirs.shape == (3, 32, 32)
    # transformers 5's processor resizes with torchvision on tensors, we with PIL: both
    # bicubic, so they differ by at most one 8-bit level, in few pixels
    diff = (ours - theirs).abs() * torch.tensor([0.2, 0.25, 0.3])[:, None, None]  # in [0, 1] units
    assert float(diff.max()) <= 1 / 255 + 1e-6
    assert float((diff > 1e-6).float().mean()) < 0.1


def test_model_id_from_the_hf_cache(hf_folder, tmp_path, monkeypatch):
    """``hf-clip:org/name`` is found in the cache offline, as a downloaded model would be."""
    import shutil

    from pipeline.encoders import load_encoder

    repo = tmp_path / "hub" / "models--org--clip-tiny"
    snap = repo / "snapshots" / ("0" * 40)
    shutil.copytree(hf_folder, snap)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text("0" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    enc = load_encoder("hf-clip:org/clip-tiny", cache_dir=str(tmp_path / "hub"))
    direct = load_encoder(f"hf-clip:{hf_folder}")
    assert enc.name == "hf-clip:clip-tiny" == direct.name
    assert enc.weights_sha256 == direct.weights_sha256
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(enc.model.encode_image(x), direct.model.encode_image(x))


def test_missing_model_id_says_what_to_download(tmp_path):
    from pipeline.encoders import WeightsNotFound, load_encoder

    with pytest.raises(WeightsNotFound, match="huggingface-cli download openai/clip-vit-large"):
        load_encoder("hf-clip:openai/clip-vit-large-patch14-336", cache_dir=str(tmp_path))


def test_round_trip_to_clip_vision_model(hf_folder):
    """The export's direction: open_clip visual -> CLIPVisionModel weights, equal hidden states."""
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from pipeline.encoders import load_encoder
    from pipeline.hf_clip import load_clip_vision, open_clip_visual_to_hf

    enc = load_encoder(f"hf-clip:{hf_folder}")
    cfg, sd = open_clip_visual_to_hf(enc.model.visual)
    model = CLIPVisionModel(CLIPVisionConfig(**cfg)).eval()
    load_clip_vision(model, sd)
    with pytest.raises(ValueError, match="missing"):
        load_clip_vision(model, {k: v for k, v in sd.items() if "layers.1." not in k})
    ref = transformers.CLIPModel.from_pretrained(hf_folder).vision_model.eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        a = model(pixel_values=x, output_hidden_states=True).hidden_states
        b = ref(pixel_values=x, output_hidden_states=True).hidden_states
    for u, v in zip(a, b, strict=True):
        torch.testing.assert_close(u, v)


def test_checkpoints_open_clip_cannot_mirror_are_refused(tmp_path):
    """Another vocabulary (open_clip's bundled BPE would give wrong tokens) or mixed
    activations are refused with the field, not converted into a silently different model."""
    from transformers import CLIPConfig, CLIPModel

    from pipeline.encoders import load_encoder

    text = {"vocab_size": 1000, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "max_position_embeddings": 77}
    vision = {"hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
              "num_attention_heads": 2, "image_size": 32, "patch_size": 8}
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision)).save_pretrained(tmp_path / "v")
    with pytest.raises(ValueError, match="vocab_size=1000: only the OpenAI BPE"):
        load_encoder(f"hf-clip:{tmp_path / 'v'}")
    CLIPModel(CLIPConfig(text_config={**text, "vocab_size": 49408, "hidden_act": "gelu"},
                         vision_config={**vision, "hidden_act": "quick_gelu"})).save_pretrained(tmp_path / "a")
    with pytest.raises(ValueError, match="different activations"):
        load_encoder(f"hf-clip:{tmp_path / 'a'}")
