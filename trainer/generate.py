"""Answering a prompt about an image with a trained model (``load_final``'s output), the way
training laid the prompt out: stage 1's plain ``<s><image>`` (it captions), stage 2's chat."""

from __future__ import annotations

from pathlib import Path

import torch


@torch.inference_mode()
def answer_ids(mllm, tok, preprocess, meta, image_path: str | None, prompt: str,
               max_new_tokens: int = 64) -> list[int]:
    """The greedy reply's token ids."""
    from pipeline.data import MAX_PIXELS, load_rgb
    from trainer.model import splice
    from trainer.prompts import generation_prompt, stop_token_ids

    fmt = "plain" if meta["stage"] == "pretrain" else "chat"
    device = mllm.adapter[0].weight.device
    has_image = image_path is not None
    ids = generation_prompt(tok, prompt, fmt, has_image)
    tokens = None
    if has_image:
        img = load_rgb(Path(image_path), MAX_PIXELS)
        tokens = mllm.visual_tokens(preprocess(img)[None].to(device))
    sp = splice(mllm.llm.get_input_embeddings(), [ids], [ids.clone()], tokens, [has_image],
                max_length=meta.get("max_length", 2048), truncation="error")
    out = mllm.llm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                            max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=stop_token_ids(tok, fmt))
    return out[0].tolist()


def answer(mllm, tok, preprocess, meta, image_path: str | None, prompt: str,
           max_new_tokens: int = 64) -> str:
    ids = answer_ids(mllm, tok, preprocess, meta, image_path, prompt, max_new_tokens)
    return tok.decode(ids, skip_special_tokens=True).strip()
