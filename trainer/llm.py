"""Loading the Hugging Face causal LM (local folder or the HF cache, never a download), and
what identifies it for the stage-1 -> stage-2 check."""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path

import torch


class LLMNotFound(RuntimeError):
    pass


def load_llm(path: str, dtype: str, device: torch.device, trained: bool = False, shard=None):
    """``dtype='auto'``: bf16 weights for a frozen LLM on a GPU (stage 1: half the memory, the
    compute runs under bf16 autocast anyway); fp32 master weights for an LLM being trained,
    since AdamW steps of lr 2e-5 mostly vanish below bf16's resolution (LLaVA's ZeRO keeps
    fp32 masters too); on CPU fp32.

    ``shard`` (FSDP): a function that shards the model in place. The model is then built with
    its parameters on the meta device, sharded, and each rank reads only its rows of each
    weight from the safetensors files (``load_sharded``): no rank ever holds the whole LLM."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

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
            if shard is None:
                model = AutoModelForCausalLM.from_pretrained(path, local_files_only=True,
                                                             dtype=torch_dtype)
            else:
                config = AutoConfig.from_pretrained(path, local_files_only=True)
                with params_on_meta():
                    model = AutoModelForCausalLM.from_config(config, dtype=torch_dtype)
                model.tie_weights()  # from_pretrained ties a tied head; from_config may not
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
    if shard is None:
        return tok, model.to(device)
    shard(model)
    load_sharded(model, _weights_folder(path), device)
    return tok, model


@contextmanager
def params_on_meta():
    """Modules built inside get their parameters on the meta device (no memory, no random
    init) and their buffers for real: buffers that are not in a checkpoint (RoPE's inv_freq)
    are computed in ``__init__`` and must survive. accelerate's ``init_empty_weights`` does the
    same; accelerate is not a dependency of ours, so this is its dozen lines."""
    register = torch.nn.Module.register_parameter

    def on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = torch.nn.Parameter(param.to("meta"),
                                                          requires_grad=param.requires_grad)

    torch.nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        torch.nn.Module.register_parameter = register


def _weights_folder(path: str) -> str:
    if os.path.isdir(os.path.expanduser(path)):
        return os.path.expanduser(path)
    from huggingface_hub import snapshot_download

    return snapshot_download(path, local_files_only=True)


def _weight_files(folder: str) -> dict[str, str]:
    """parameter name -> safetensors file holding it (one file, or a sharded index)."""
    import json

    from safetensors import safe_open

    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(Path(folder) / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = Path(folder) / "model.safetensors"
    if not single.is_file():
        raise LLMNotFound(f"{folder} has no model.safetensors nor model.safetensors.index.json: "
                          f"FSDP loads each rank's part from safetensors files (convert .bin "
                          f"weights with save_pretrained(safe_serialization=True))")
    with safe_open(str(single), framework="pt") as f:
        return dict.fromkeys(f.keys(), str(single))


def load_sharded(model: torch.nn.Module, folder: str, device: torch.device) -> None:
    """Materialise a model built by ``params_on_meta`` (and sharded) on ``device``: every
    parameter's local part (a DTensor's shard, or a plain tensor whole) is read as a slice of
    its safetensors entry, so a rank reads and holds only its own rows."""
    from safetensors import safe_open
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):  # to_empty may swap a tied pair apart
        model.tie_weights()
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    files = _weight_files(folder)
    handles: dict[str, object] = {}
    try:
        for name, param in model.named_parameters():
            if name not in files:
                raise LLMNotFound(f"{folder}: the weights have no '{name}' (the model's config "
                                  f"and its safetensors disagree)")
            f = handles.get(files[name])
            if f is None:
                f = handles[files[name]] = safe_open(files[name], framework="pt").__enter__()
            local = param.to_local() if isinstance(param, DTensor) else param
            if isinstance(param, DTensor):
                shape, offset = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements)
            else:
                shape, offset = tuple(param.shape), (0,) * param.dim()
            if local.numel() == 0:
                continue
            part = f.get_slice(name)[tuple(slice(o, o + n) for o, n in zip(offset, shape))]
            with torch.no_grad():
                local.copy_(part.reshape(local.shape))
    finally:
        for f in handles.values():
            f.__exit__(None, None, None)


IDENTITY_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def llm_identity(path: str, llm) -> dict:
    """What must agree between the LLM a stage-1 adapter was trained for and stage 2's: the
    folder's or id's name (not the full path: clusters mount models in different places) and
    the architecture fields that decide whether the adapter's output space is the same."""
    cfg = llm.config
    return {"name": Path(str(path).rstrip("/")).name,
            **{k: getattr(cfg, k, None) for k in IDENTITY_FIELDS}}
