"""S2-Wrapper tower: its defining properties on a tiny CLIP tower."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainer.model import MLLM, VisionTower


@pytest.fixture(scope="module")
def visual(tiny_clip):
    from pipeline.encoders import load_encoder

    return load_encoder(tiny_clip).model.visual  # 64 px, patch 8: an 8 x 8 grid


def test_base_scale_alone_is_the_plain_tower(visual):
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(VisionTower(visual, -2, [64])(x), VisionTower(visual, -2)(x))


@pytest.mark.parametrize("scales", [[64, 128], [64, 128, 192]])
def test_each_scale_is_its_tiles_encoded_one_by_one_merged_and_pooled(visual, scales):
    """The reference's semantics, written as plainly as possible: per scale, resize the image,
    encode every base-size tile alone, lay the tiles' patch grids side by side, average-pool
    back to the base grid; concatenate the scales' channels, base first."""
    plain = VisionTower(visual, -2)
    gh, gw = plain.grid
    torch.manual_seed(0)
    x = torch.randn(2, 3, scales[-1], scales[-1])
    with torch.no_grad():
        got = VisionTower(visual, -2, scales)(x)
        blocks = []
        for size in scales:
            xs = x if size == scales[-1] else F.interpolate(x, size=(size, size), mode="bicubic")
            n = size // 64
            canvas = torch.zeros(2, plain.width, gh * n, gw * n)
            for i in range(n):
                for j in range(n):
                    tile = xs[:, :, i * 64:(i + 1) * 64, j * 64:(j + 1) * 64]
                    tok = plain(tile)  # (2, gh*gw, C)
                    canvas[:, :, i * gh:(i + 1) * gh, j * gw:(j + 1) * gw] = (
                        tok.transpose(1, 2).reshape(2, -1, gh, gw))
            pooled = F.avg_pool2d(canvas, n) if n > 1 else canvas
            blocks.append(pooled.flatten(2).transpose(1, 2))
        torch.testing.assert_close(got, torch.cat(blocks, dim=-1), atol=1e-5, rtol=1e-5)
    assert got.shape == (2, gh * gw, plain.width * len(scales))


def test_adapter_width_follows_the_scales(visual, tiny_llm):
    from transformers import AutoModelForCausalLM

    llm = AutoModelForCausalLM.from_pretrained(tiny_llm)
    m = MLLM(visual, llm, -2, [64, 128, 192])
    assert m.adapter[0].in_features == 3 * m.vision.tokens(torch.zeros(1, 3, 64, 64)).shape[-1]
    assert m.visual_tokens(torch.zeros(1, 3, 192, 192)).shape == (1, 64, llm.config.hidden_size)


def test_bad_scales_are_refused(visual):
    with pytest.raises(ValueError, match="start with the tower's own size 64"):
        VisionTower(visual, -2, [128, 64])
    with pytest.raises(ValueError, match="multiples of 64"):
        VisionTower(visual, -2, [64, 100])


def test_s2_preprocess_crops_the_same_region_larger(tiny_clip):
    from PIL import Image

    from pipeline.encoders import load_encoder
    from trainer.s2 import scaled_preprocess

    pre = load_encoder(tiny_clip).preprocess
    img = Image.linear_gradient("L").resize((90, 60)).convert("RGB")
    small, big = pre(img), scaled_preprocess(pre, 192)(img)
    assert small.shape == (3, 64, 64) and big.shape == (3, 192, 192)
    # the same region: the big crop, area-pooled to 64, is the small one up to resampling
    assert float((F.avg_pool2d(big[None], 3)[0] - small).abs().mean()) < 0.05


def test_an_s2_run_trains_loads_and_exports_to_llava_only(pretrain_cfg, tmp_path, capsys):
    """Stage 1 with S2 scales end to end: final/ records the scales and load_final gives the
    large-scale transform; hf-llava refuses the tower, llava writes LLaVA's s2 settings."""
    import json

    from trainer.__main__ import main
    from trainer.final import load_final
    from trainer.train import train

    run = train(pretrain_cfg("vision.s2_scales=[64, 128]", "optim.max_steps=1"))
    mllm, _, pre, meta = load_final(run["final"])
    assert meta["vision"]["s2_scales"] == [64, 128] and mllm.adapter[0].in_features == 2 * 64
    assert [t.size for t in pre.transforms[:2]] == [128, (128, 128)]
    assert main(["export", "--run", run["final"], "--format", "hf-llava",
                 "--out", str(tmp_path / "hf")]) == 2
    assert "S2-Wrapper tower cannot be exported as hf-llava" in capsys.readouterr().err
    assert main(["export", "--run", run["final"], "--format", "llava",
                 "--out", str(tmp_path / "llava")]) == 0
    cfg = json.loads((tmp_path / "llava" / "config.json").read_text())
    assert (cfg["s2"], cfg["s2_scales"], cfg["s2_max_split_size"], cfg["mm_hidden_size"]) == (
        True, "64,128", 64, 128)
