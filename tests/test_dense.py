"""Each per-patch mode against an independent computation on a tiny model."""

import pytest
import torch
import torch.nn.functional as F

from pipeline import dense
from pipeline.encoders import load_encoder


@pytest.fixture(scope="module")
def clip_visual(tiny_clip):
    return load_encoder(tiny_clip).model.visual


@pytest.fixture(scope="module")
def images():
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def test_raw_tokens_equal_open_clip_output_tokens_times_proj(clip_visual, images):
    clip_visual.output_tokens = True
    try:
        pooled, tokens = clip_visual(images)  # open_clip's own forward: tokens after ln_post
    finally:
        clip_visual.output_tokens = False
    patches, glob = dense.clip_patch_features(clip_visual, images, "raw")
    torch.testing.assert_close(patches, tokens @ clip_visual.proj, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(glob, pooled, rtol=1e-5, atol=1e-5)


def _reference_surgery(visual, x, depth):
    """CLIP Surgery's VisionTransformer, transcribed from its reference code (qkv split by
    reshape/permute, the dual path carried as a list through the blocks). Kept batch-first:
    the reference's LND layout is only a transpose."""
    x = visual._embeds(x)
    blocks = list(visual.transformer.resblocks)
    n = len(blocks)

    def attention(blk, t):  # the reference `Attention.forward` on (B, N, C)
        B, N, C = t.shape
        H = blk.attn.num_heads
        qkv = F.linear(t, blk.attn.in_proj_weight, blk.attn.in_proj_bias)
        qkv = qkv.reshape(B, N, 3, H, C // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        scale = (C // H) ** -0.5
        attn_ori = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        k = v
        q = k
        attn = ((q @ k.transpose(-2, -1)) * scale).softmax(dim=-1)
        x_ori = (attn_ori @ v).transpose(1, 2).reshape(B, N, C)
        xx = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return [blk.attn.out_proj(xx), blk.attn.out_proj(x_ori)]

    for i, blk in enumerate(blocks):
        if i < n - depth:  # single path before the surgery blocks
            x = x + blk.attn(blk.ln_1(x), blk.ln_1(x), blk.ln_1(x), need_weights=False)[0]
            x = x + blk.mlp(blk.ln_2(x))
        elif isinstance(x, list):
            x, x_ori = x
            x_res, x_ori_res = attention(blk, blk.ln_1(x_ori))
            x_ori = x_ori + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x = [x + x_res, x_ori]  # skip ffn for the new path
        else:  # start of dual path
            x_res, x_ori_res = attention(blk, blk.ln_1(x))
            x_ori = x + x_ori_res
            x_ori = x_ori + blk.mlp(blk.ln_2(x_ori))
            x = [x + x_res, x_ori]
    x, x_ori = x
    x = x.clone()
    x[:, 0] = x_ori[:, 0]  # cls token from the original path
    return visual.ln_post(x) @ visual.proj


@torch.no_grad()
@pytest.mark.parametrize("depth", [1, 2, 3])
def test_surgery_path_matches_reference_transcription(clip_visual, images, depth):
    want = _reference_surgery(clip_visual, images, depth)
    patches, glob = dense.clip_patch_features(clip_visual, images, "surgery", surgery_depth=depth)
    torch.testing.assert_close(patches, want[:, 1:], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(glob, want[:, 0], rtol=1e-4, atol=1e-5)
    # the class token comes from the unchanged path: the model's own image embedding
    torch.testing.assert_close(glob, clip_visual(images), rtol=1e-4, atol=1e-5)


@torch.no_grad()
def test_surgery_depth_zero_is_raw(clip_visual, images):
    a, _ = dense.clip_patch_features(clip_visual, images, "surgery", surgery_depth=0)
    b, _ = dense.clip_patch_features(clip_visual, images, "raw")
    torch.testing.assert_close(a, b)


def _feature_surgery_literal(image_features, text_features, weights="cls"):
    """CLIP Surgery's `clip_feature_surgery` (no redundant_feats), element-wise as written.

    ``cls``: xmed-lab/CLIP_Surgery `clip/clip.py` at d2cf33f (2023-04-13, HEAD): every token
    weighted by the class token's similarities, ``w.reshape(1, 1, n_t, 1)`` (so one image per
    call, as upstream's demo uses it). ``token``: the "demo version" 9f5be11 (2023-04-12): each
    token weighted by its own similarities, ``w.reshape(b, n_i, n_t, 1)``.
    """
    if weights == "cls":
        return torch.cat([_feature_surgery_literal_d2cf33f(image_features[i:i + 1], text_features)
                          for i in range(image_features.shape[0])])
    prob = image_features @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = (image_features.shape[0], text_features.shape[0],
                      image_features.shape[1], image_features.shape[2])
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats *= w.reshape(b, n_i, n_t, 1)
    redundant_feats = feats.mean(2, keepdim=True)
    feats = feats - redundant_feats
    return feats.sum(-1)


def _feature_surgery_literal_d2cf33f(image_features, text_features):
    prob = image_features[:, :1, :] @ text_features.t()
    prob = (prob * 2).softmax(-1)
    w = prob / prob.mean(-1, keepdim=True)
    b, n_t, n_i, c = (image_features.shape[0], text_features.shape[0],
                      image_features.shape[1], image_features.shape[2])
    feats = image_features.reshape(b, n_i, 1, c) * text_features.reshape(1, 1, n_t, c)
    feats *= w.reshape(1, 1, n_t, 1)
    redundant_feats = feats.mean(2, keepdim=True)
    feats = feats - redundant_feats
    return feats.sum(-1)


def _surgery_inputs(b=2, p=12, d=8, w=30, seed=3):
    g = torch.Generator().manual_seed(seed)
    feats = F.normalize(torch.randn(b, 1 + p, d, generator=g, dtype=torch.float64), dim=-1)
    text = F.normalize(torch.randn(w, d, generator=g, dtype=torch.float64), dim=-1)
    return feats, text


@pytest.mark.parametrize("weights", ["token", "cls"])
def test_surgery_closed_form_equals_literal_transcription(weights):
    feats, text = _surgery_inputs()
    want = _feature_surgery_literal(feats, text, weights)[:, 1:]
    got = dense.surgery_scores(feats[:, 1:], feats[:, 0], text, weights=weights)
    torch.testing.assert_close(got, want)


def test_surgery_defaults_to_the_current_upstream_code(extract_cfg):
    # the current xmed-lab code (d2cf33f) weights by the class token; 9f5be11 was the demo version
    from pipeline.config import ExtractConfig
    from pipeline.stages import Labeler

    assert ExtractConfig().labels.surgery_weights == "cls"
    feats, text = _surgery_inputs()
    torch.testing.assert_close(dense.surgery_scores(feats[:, 1:], feats[:, 0], text),
                               _feature_surgery_literal(feats, text, "cls")[:, 1:])
    assert Labeler(extract_cfg("labels.mode=surgery"), progress=False).metadata()["surgery_weights"] == "cls"


def test_surgery_weightings_differ():
    # the two upstream versions are not the same function: a test of one cannot pass the other
    feats, text = _surgery_inputs()
    a = dense.surgery_scores(feats[:, 1:], feats[:, 0], text, weights="token")
    b = dense.surgery_scores(feats[:, 1:], feats[:, 0], text, weights="cls")
    assert (a - b).abs().max() > 1e-3


def test_token_surgery_ranks_like_cosine():
    # per patch, score = w * cos - const with w increasing in cos: the ranking of the words
    # whose cosine is above -1/2 is the cosine's own (README, "Surgery weights")
    feats, text = _surgery_inputs(p=40, w=200, d=16)
    patches = feats[:, 1:]
    got = dense.surgery_scores(patches, feats[:, 0], text, weights="token")
    cos = patches @ text.T
    k = 10
    assert (cos.topk(k, dim=-1).values > -0.5).all()
    torch.testing.assert_close(got.topk(k, dim=-1).indices, cos.topk(k, dim=-1).indices, rtol=0, atol=0)


def test_surgery_weights_are_named_in_metadata(extract_cfg):
    from pipeline.stages import Labeler

    for weights in ("token", "cls"):
        cfg = extract_cfg("labels.mode=surgery", f"labels.surgery_weights={weights}")
        assert Labeler(cfg, progress=False).metadata()["surgery_weights"] == weights
    # not a surgery run: the field says so instead of naming a weighting that was not used
    assert Labeler(extract_cfg(), progress=False).metadata()["surgery_weights"] is None


@torch.no_grad()
def test_siglip_value_path_is_the_pool_head_on_one_patch(tiny_siglip):
    visual = load_encoder(tiny_siglip).model.visual
    trunk = visual.trunk
    img = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    ours, _ = dense.siglip_patch_features(visual, img)
    tokens = trunk.forward_features(img)
    assert tokens.shape[1] == 64  # no class token
    for i in (0, 17, 63):
        # the model's real head (attention pool + fc_norm + head + open_clip proj), fed one patch:
        # softmax over a single key is 1, so the pooled output is that patch's value path
        want = visual.head(trunk.forward_head(tokens[:, i:i + 1]))
        torch.testing.assert_close(ours[:, i], want, rtol=1e-5, atol=1e-5)
