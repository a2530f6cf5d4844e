"""The trained model's ``final/`` folder: written by ``export`` at the end of training, read
by ``load_final``; ``answer`` replies to a prompt about an image with it."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from seacore.config import config_hash
from trainer import distributed as D


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
    mllm.adapter.load_state_dict(read_adapter(path / "adapter.safetensors")[0])
    mllm.eval().requires_grad_(False)
    return mllm, tok, enc.preprocess, meta


def read_adapter(path: str | Path) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """``adapter.safetensors`` (written by ``export``) -> (adapter state dict, log tau or None)."""
    from safetensors.torch import load_file

    tensors = load_file(str(path))
    state = {k[len("adapter."):]: t for k, t in tensors.items() if k.startswith("adapter.")}
    return state, tensors.get("log_tau")


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


def export(p, out: Path) -> None:
    """What inference needs: adapter (+ temperature), the LLM (stage 2: the trained one;
    stage 1: a reference to the frozen one), the vision tower's reference and the config."""
    from safetensors.torch import save_file
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    full = get_model_state_dict(p.task, options=StateDictOptions(
        full_state_dict=True, cpu_offload=True, ignore_frozen_params=True))
    if not p.dist.is_main():
        D.barrier(p.dist)
        return
    out.mkdir(parents=True, exist_ok=True)
    tensors = {k[len("mllm."):]: v.contiguous() for k, v in full.items() if k.startswith("mllm.adapter.")}
    if "align.log_tau" in full:
        tensors["log_tau"] = full["align.log_tau"].reshape(1)
    save_file(tensors, str(out / "adapter.safetensors"))
    llm_ref = p.cfg.llm.path
    if p.stage == "finetune":
        llm_state = {k[len("mllm.llm."):]: v for k, v in full.items() if k.startswith("mllm.llm.")}
        p.task.mllm.llm.save_pretrained(out / "llm", state_dict=llm_state, safe_serialization=True)
        p.tokenizer.save_pretrained(out / "llm")
        llm_ref = "llm"
    if p.task.train_vision:
        vis = {k[len("mllm.vision.visual."):]: v.contiguous() for k, v in full.items()
               if k.startswith("mllm.vision.visual.")}
        save_file(vis, str(out / "vision.safetensors"))
    enc = p.encoder
    (out / "sea_model.json").write_text(json.dumps({
        "stage": p.stage, "llm": llm_ref,
        "vision": {"model": p.cfg.vision.model, "pretrained": p.cfg.vision.pretrained,
                   "weights_sha256": enc.weights_sha256, "feature_layer": p.cfg.vision.feature_layer,
                   "image_size": list(enc.image_size), "grid": list(enc.grid),
                   "tuned_weights": "vision.safetensors" if p.task.train_vision else None},
        "adapter": "mlp2x_gelu", "max_length": p.cfg.data.max_length,
        "config_hash": config_hash(p.cfg)}, indent=2))
    D.barrier(p.dist)
