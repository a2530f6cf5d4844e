"""The caption / answer loss runs the LM's output head only where a label is read.

The reference is transformers' own ``llm(inputs_embeds=..., labels=...).loss`` (logits at every
position, its shift and mean): the loss and every gradient must equal it in fp32, for the LM
alone (a Llama and a Gemma-2 with logit soft-capping) and through the training task of both
stages, with and without SEA.
"""

from __future__ import annotations

import pytest
import torch

from trainer.model import IGNORE_INDEX, supervised_lm_loss


def _full_loss(llm, embeds, mask, labels):
    return llm(inputs_embeds=embeds, attention_mask=mask, labels=labels, use_cache=False).loss


def _inputs(llm, B=3, T=17, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = llm.get_input_embeddings().weight.shape[1]
    V = llm.get_input_embeddings().weight.shape[0]
    embeds = torch.randn(B, T, H, generator=g)
    mask = torch.ones(B, T, dtype=torch.long)
    mask[1, 12:] = 0  # right padding
    labels = torch.randint(0, V, (B, T), generator=g)
    labels[:, :9] = IGNORE_INDEX  # the visual tokens and the prompt
    labels[1, 12:] = IGNORE_INDEX
    labels[2, 13] = IGNORE_INDEX  # a hole inside an answer (a user turn between two answers)
    return embeds, mask, labels


def _llms():
    from transformers import Gemma2Config, Gemma2ForCausalLM, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    common = dict(vocab_size=97, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    yield "llama", LlamaForCausalLM(LlamaConfig(**common, tie_word_embeddings=False))
    yield "gemma2-softcap", Gemma2ForCausalLM(Gemma2Config(
        **common, head_dim=8, final_logit_softcapping=3.0, attn_logit_softcapping=None))


@pytest.mark.parametrize("name,llm", list(_llms()), ids=lambda x: x if isinstance(x, str) else "")
def test_loss_and_gradients_equal_the_full_logits(name, llm):
    llm.train()
    embeds, mask, labels = _inputs(llm)
    got_x = embeds.clone().requires_grad_(True)
    got = supervised_lm_loss(llm, got_x, mask, labels)
    got.backward()
    got_g = {n: p.grad.clone() for n, p in llm.named_parameters() if p.grad is not None}
    llm.zero_grad()
    ref_x = embeds.clone().requires_grad_(True)
    ref = _full_loss(llm, ref_x, mask, labels)
    ref.backward()
    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(got_x.grad, ref_x.grad, rtol=1e-5, atol=1e-7)
    assert got_g.keys() == {n for n, p in llm.named_parameters() if p.grad is not None}
    for n, p in llm.named_parameters():
        if p.grad is not None:
            torch.testing.assert_close(got_g[n], p.grad, rtol=1e-5, atol=1e-7, msg=n)


def test_the_head_sees_only_supervised_positions():
    _, llm = next(_llms())
    embeds, mask, labels = _inputs(llm)
    rows = []
    h = llm.get_output_embeddings().register_forward_hook(
        lambda _m, inp, _o: rows.append(inp[0].reshape(-1, inp[0].shape[-1]).shape[0]))
    supervised_lm_loss(llm, embeds, mask, labels)
    h.remove()
    assert rows == [int((labels[:, 1:] != IGNORE_INDEX).sum())]  # 3 x 17 positions -> 20


@pytest.mark.parametrize("stage,weight", [("pretrain", 0), ("pretrain", 1), ("finetune", 0),
                                          ("finetune", 1)])
def test_the_training_task_equals_the_full_computation(stage, weight, pretrain_cfg, finetune_cfg,
                                                       label_run, monkeypatch):
    import trainer.task as task_mod
    from trainer.train import build, forward_backward

    over = [f"sea.weight={weight}", "optim.max_steps=1"]
    cfg = (pretrain_cfg(*over) if stage == "pretrain"
           else finetune_cfg(*over, f"data.shards={label_run}"))
    p = build(cfg, stage)
    p.task.train()
    p.dataset.set_position(0, 0)
    micro = [b for b, _ in zip(iter(p.dataset), range(p.accum), strict=False)]

    def grads_and_loss():
        p.optimizer.zero_grad(set_to_none=True)
        m = forward_backward(p, micro, 0)
        return m, {n: q.grad.clone() for n, q in p.task.named_parameters() if q.grad is not None}

    got_m, got_g = grads_and_loss()
    monkeypatch.setattr(task_mod, "supervised_lm_loss", _full_loss)
    ref_m, ref_g = grads_and_loss()
    assert got_m["lm_loss"] > 0 and (weight == 0) == (got_m["align_loss"] == 0)
    for k in ("loss", "lm_loss", "align_loss"):
        assert got_m[k] == pytest.approx(ref_m[k], rel=1e-6, abs=1e-7), k
    assert got_g.keys() == ref_g.keys() and got_g
    for n in ref_g:
        torch.testing.assert_close(got_g[n], ref_g[n], rtol=1e-5, atol=1e-7, msg=n)
