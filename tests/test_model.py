"""The MLLM: splice positions, truncation, which parameters train, and lambda = 0."""

import pytest
import torch

from trainer.model import IGNORE_INDEX, IMAGE_TOKEN_INDEX, splice


def _ids(*parts):
    return torch.tensor(parts, dtype=torch.long)


def test_splice_positions_for_images_anywhere():
    embed = torch.nn.Embedding(50, 4)
    P = 3
    feats = torch.arange(2 * P * 4, dtype=torch.float).reshape(2, P, 4) + 100
    ids = [_ids(1, IMAGE_TOKEN_INDEX, 5, 6),        # image right after BOS
           _ids(1, 7, 8, 9, IMAGE_TOKEN_INDEX, 5),  # image mid-prompt
           _ids(1, 7, 8)]                           # text only
    labels = [i.clone() for i in ids]
    labels[0][:2] = IGNORE_INDEX
    sp = splice(embed, ids, [torch.where(x == IMAGE_TOKEN_INDEX, IGNORE_INDEX, x) for x in labels],
                feats, [True, True, False], max_length=32)
    assert sp.image_starts.tolist() == [1, 4, -1]
    assert sp.inputs_embeds.shape == (3, 5 + P, 4)
    for row, start, img in [(0, 1, 0), (1, 4, 1)]:
        torch.testing.assert_close(sp.inputs_embeds[row, start:start + P], feats[img])
        assert (sp.labels[row, start:start + P] == IGNORE_INDEX).all()
    # text around the image is the token embeddings, in order
    torch.testing.assert_close(sp.inputs_embeds[1, start + P], embed.weight[5])
    torch.testing.assert_close(sp.inputs_embeds[1, 1:4], embed.weight[[7, 8, 9]])
    assert sp.attention_mask.sum(1).tolist() == [3 + P, 5 + P, 3]
    assert sp.labels[1, 4 + P] == 5


def test_truncation_never_cuts_image_tokens():
    embed = torch.nn.Embedding(50, 4)
    feats = torch.zeros(2, 4, 4)
    ids = [_ids(1, IMAGE_TOKEN_INDEX, 5, 6, 7), _ids(1, 2, 3, 4, IMAGE_TOKEN_INDEX, 5)]
    sp = splice(embed, ids, [i.clone() for i in ids], feats, [True, True], max_length=6)
    # sample 0: image fits (positions 1-4), text tail cut; sample 1: image would end at 8 > 6
    assert sp.keep.tolist() == [True, False]
    assert sp.inputs_embeds.shape[:2] == (1, 6)
    with pytest.raises(ValueError, match="beyond max_length"):
        splice(embed, ids, [i.clone() for i in ids], feats, [True, True], 6, truncation="error")


def _parts(cfg):
    from trainer.train import build

    return build(cfg, "pretrain")


def _first_batches(p, n):
    p.dataset.set_position(0, 0)
    it = iter(torch.utils.data.DataLoader(p.dataset, batch_size=None, num_workers=0))
    return [next(it) for _ in range(n)]


def test_step_trains_adapter_only(pretrain_cfg):
    from trainer.train import train_step

    p = _parts(pretrain_cfg())
    before = {n: t.detach().clone() for n, t in p.task.named_parameters()}
    p.task.train()
    p.task.mllm.set_trainable(adapter=True)
    m = train_step(p, _first_batches(p, p.accum), step=0)
    assert m["pairs"] > 0 and m["align_loss"] > 0
    changed = {n for n, t in p.task.named_parameters() if not torch.equal(t, before[n])}
    assert changed and all(n.startswith(("mllm.adapter.", "align.log_tau")) for n in changed)
    assert "align.log_tau" in changed
    assert any(n.startswith("mllm.adapter.") for n in changed)
    for n, t in p.task.named_parameters():
        if n.startswith(("mllm.llm.", "mllm.vision.")):
            assert torch.equal(t, before[n]), n  # frozen: bit-identical


def test_lambda_zero_is_the_plain_caption_loss(pretrain_cfg):
    p = _parts(pretrain_cfg("sea.weight=0"))
    assert p.task.align is None
    batch = _first_batches(p, 1)[0]
    with torch.no_grad():
        out = p.task(batch)
        # the plain LLaVA loss computed directly: image tokens, caption CE on caption tokens
        m = p.task.mllm
        tokens = m.adapter(m.vision(batch["pixels"]))
        sp = splice(m.llm.get_input_embeddings(), batch["input_ids"], batch["labels"], tokens,
                    batch["has_image"], 2048)
        logits = m.llm(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask).logits
        want = torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), sp.labels[:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX)
    assert float(out["loss"]) == pytest.approx(float(want), rel=1e-5)
    assert float(out["align_loss"]) == 0.0


def test_shard_encoder_mismatch_is_refused_at_start(pretrain_cfg, tmp_path):
    from pipeline.shards import ShardMismatch
    from pipeline.tiny import save_tiny
    from trainer.train import build

    other = save_tiny("clip", tmp_path / "other-clip", seed=7)  # same shape, other weights
    with pytest.raises(ShardMismatch, match="'encoder' is 'tiny-clip-seed0' but 'tiny-clip-seed7'"):
        build(pretrain_cfg(f"vision.model={other}"), "pretrain")
    words = tmp_path / "words.txt"
    words.write_text("cat\ndog\n")
    with pytest.raises(ShardMismatch, match="'wordlist_sha256'"):
        build(pretrain_cfg(f"sea.wordlist={words}"), "pretrain")
    with pytest.raises(ValueError, match="data.shards"):
        pretrain_cfg("data.shards=null")


def test_visual_tokens_come_from_the_penultimate_layer(pretrain_cfg):
    from pipeline import dense

    p = _parts(pretrain_cfg())
    v = p.task.mllm.vision
    x = torch.randn(1, 3, 64, 64)
    depth = len(v.visual.transformer.resblocks)
    with torch.no_grad():
        want = dense.clip_hidden(v.visual, x, depth - 1)[:, 1:]
        v.visual.output_tokens = False
        torch.testing.assert_close(v(x), want)
    assert v.num_blocks == depth - 1 and v(x).shape[1] == 64  # class token dropped


def test_eval_keeps_frozen_parts_in_eval_mode(pretrain_cfg):
    from trainer.train import eval_alignment, set_train_mode

    p = _parts(pretrain_cfg())
    set_train_mode(p)
    eval_alignment(p, max_images=2)
    assert p.task.mllm.adapter.training
    assert not p.task.mllm.llm.training and not p.task.mllm.vision.training


def test_batch_with_nothing_to_predict_gives_zero_lm_loss(pretrain_cfg):
    p = _parts(pretrain_cfg())
    batch = _first_batches(p, 1)[0]
    batch["labels"] = [torch.full_like(x, IGNORE_INDEX) for x in batch["labels"]]
    from trainer.train import step_sample

    out = p.task(batch, step_sample(p, [batch]), 0)
    assert float(out["lm_loss"].detach()) == 0.0 and out["loss"].requires_grad
    out["loss"].backward()
    assert p.task.mllm.adapter[0].weight.grad is not None
