"""Load a trained model's ``final/`` folder and answer a prompt about an image."""

from __future__ import annotations

import json
from pathlib import Path

import torch


def load_final(path: str | Path, device: str | torch.device = "cpu"):
    """-> (mllm, tokenizer, preprocess, meta). ``path``: a run dir or its ``final/``."""
    from safetensors.torch import load_file

    from pipeline.encoders import load_encoder
    from trainer.model import MLLM
    from trainer.train import load_llm

    path = Path(path)
    if not (path / "sea_model.json").is_file() and (path / "final" / "sea_model.json").is_file():
        path = path / "final"
    if not (path / "sea_model.json").is_file():
        raise FileNotFoundError(f"{path} holds no sea_model.json (a training run's final/ folder)")
    meta = json.loads((path / "sea_model.json").read_text())
    v = meta["vision"]
    device = torch.device(device)
    enc = load_encoder(v["model"], v["pretrained"], device=device)
    if v.get("weights_sha256") and enc.weights_sha256 != v["weights_sha256"]:
        raise ValueError(f"vision weights {enc.weights_sha256} differ from the trained model's "
                         f"{v['weights_sha256']}")
    if v.get("tuned_weights"):
        enc.model.visual.load_state_dict(load_file(str(path / v["tuned_weights"])))
    llm_path = str(path / meta["llm"]) if (path / meta["llm"]).is_dir() else meta["llm"]
    tok, llm = load_llm(llm_path, "auto", device)
    mllm = MLLM(enc.model.visual, llm, v["feature_layer"]).to(device)
    tensors = load_file(str(path / "adapter.safetensors"))
    mllm.adapter.load_state_dict({k[len("adapter."):]: t for k, t in tensors.items()
                                  if k.startswith("adapter.")})
    mllm.eval().requires_grad_(False)
    return mllm, tok, enc.preprocess, meta


@torch.inference_mode()
def answer(mllm, tok, preprocess, meta, image_path: str | None, prompt: str,
           max_new_tokens: int = 64) -> str:
    from pipeline.data import load_rgb
    from trainer.model import splice
    from trainer.prompts import generation_prompt

    fmt = "plain" if meta["stage"] == "pretrain" else "chat"
    device = mllm.adapter[0].weight.device
    has_image = image_path is not None
    ids = generation_prompt(tok, prompt, fmt, has_image)
    tokens = None
    if has_image:
        img = load_rgb(Path(image_path), 89_478_485)
        tokens = mllm.visual_tokens(preprocess(img)[None].to(device))
    sp = splice(mllm.llm.get_input_embeddings(), [ids], [ids.clone()], tokens, [has_image],
                max_length=meta.get("max_length", 2048), truncation="error")
    out = mllm.llm.generate(inputs_embeds=sp.inputs_embeds, attention_mask=sp.attention_mask,
                            max_new_tokens=max_new_tokens, do_sample=False,
                            pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    return tok.decode(out[0], skip_special_tokens=True).strip()
