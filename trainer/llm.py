"""Loading the Hugging Face causal LM (local folder or the HF cache, never a download), and
what identifies it for the stage-1 -> stage-2 check."""

from __future__ import annotations

import os
from pathlib import Path

import torch


class LLMNotFound(RuntimeError):
    pass


def load_llm(path: str, dtype: str, device: torch.device, trained: bool = False):
    """``dtype='auto'``: bf16 weights for a frozen LLM on a GPU (stage 1: half the memory, the
    compute runs under bf16 autocast anyway); fp32 master weights for an LLM being trained,
    since AdamW steps of lr 2e-5 mostly vanish below bf16's resolution (LLaVA's ZeRO keeps
    fp32 masters too); on CPU fp32."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    auto = torch.bfloat16 if device.type == "cuda" and not trained else torch.float32
    torch_dtype = {"auto": auto, "float32": torch.float32, "bfloat16": torch.bfloat16,
                   "float16": torch.float16}[dtype]
    local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1
    if local and not os.path.isdir(os.path.expanduser(path)):
        raise LLMNotFound(f"llm.path {path} is a filesystem path but not a folder; point it at a "
                          f"folder with config.json, the weights and the tokenizer (or give a "
                          f"Hugging Face model id such as lmsys/vicuna-7b-v1.5 already in the cache)")
    from seacore.quiet import no_loading_bars

    try:
        with no_loading_bars():
            tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
            model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True, dtype=torch_dtype)
    except OSError as e:
        if os.path.isdir(os.path.expanduser(path)):
            raise LLMNotFound(f"llm.path {path} is a folder, but not a loadable model ({e}); it "
                              f"needs config.json, the weights and the tokenizer files") from e
        raise LLMNotFound(
            f"LLM '{path}' is not a local folder nor in the Hugging Face cache ({e}). On a machine "
            f"with network access run `huggingface-cli download {path}` (fills ~/.cache/huggingface), "
            f"or point llm.path at a folder with config.json, the weights and the tokenizer.") from e
    if tok.pad_token_id is None:
        tok.pad_token = tok.eos_token or tok.unk_token
    return tok, model.to(device)


IDENTITY_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def llm_identity(path: str, llm) -> dict:
    """What must agree between the LLM a stage-1 adapter was trained for and stage 2's: the
    folder's or id's name (not the full path: clusters mount models in different places) and
    the architecture fields that decide whether the adapter's output space is the same."""
    cfg = llm.config
    return {"name": Path(str(path).rstrip("/")).name,
            **{k: getattr(cfg, k, None) for k in IDENTITY_FIELDS}}
