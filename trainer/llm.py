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

    index = Path(folder) / "model.safetensors.index.json"
    if index.is_file():
        return {k: str(Path(folder) / f) for k, f in json.loads(index.read_text())["weight_map"].items()}
    single = Path(folder) / "model.safetensors"
    if not single.is_file():
        raise LLMNotFound(f"{folder} has no model.safetensors nor model.safetensors.index.json: "
                          f"FSDP loads each rank's part from safetensors files (convert .bin "
                          f"weights with save_pretrained(safe_serialization=True))")
    return dict.fromkeys(_header(str(single))[0], str(single))


_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
           "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
           "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}


def _header(path: str) -> tuple[dict, int]:
    """A safetensors file's tensor table and where its data starts (the format: an 8-byte
    little-endian length, that many bytes of JSON, the data)."""
    import json

    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        table = json.loads(f.read(n))
    table.pop("__metadata__", None)
    return table, 8 + n


def _read_rows(f, info: dict, data_start: int, first: int, out: torch.Tensor) -> None:
    """Rows ``first .. first + len(out)`` of a stored tensor into ``out``, read with plain file
    I/O: exactly those bytes, no memory map (a mapped file's touched pages count as the
    process's memory until it is closed, as much again as the shard itself)."""
    dtype, shape = _DTYPES[info["dtype"]], info["shape"]
    row = dtype.itemsize
    for d in shape[1:]:
        row *= d
    f.seek(data_start + info["data_offsets"][0] + first * row)
    direct = out.device.type == "cpu" and out.dtype == dtype and out.is_contiguous()
    buf = out if direct else torch.empty(out.shape, dtype=dtype)
    view = buf.reshape(-1).view(torch.uint8).numpy()
    if f.readinto(memoryview(view)) != view.nbytes:
        raise LLMNotFound(f"{f.name}: ends inside tensor data (truncated file)")
    if not direct:
        out.copy_(buf)


def load_sharded(model: torch.nn.Module, folder: str, device: torch.device) -> None:
    """Materialise a model built by ``params_on_meta`` (and sharded) on ``device``: every
    parameter's local part (a DTensor's rows, FSDP2's dim-0 shard, or a plain tensor whole)
    is read from its safetensors entry, so a rank reads and holds only its own rows."""
    from torch.distributed.tensor import DTensor
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    model.to_empty(device=device)
    if hasattr(model, "tie_weights"):  # to_empty may swap a tied pair apart
        model.tie_weights()
    for n, b in model.named_buffers():
        b.copy_(buffers[n])
    files = _weight_files(folder)
    headers: dict[str, tuple[dict, int]] = {}
    handles: dict[str, object] = {}
    try:
        for name, param in model.named_parameters():
            if name not in files:
                raise LLMNotFound(f"{folder}: the weights have no '{name}' (the model's config "
                                  f"and its safetensors disagree)")
            path = files[name]
            if path not in handles:
                headers[path] = _header(path)
                handles[path] = open(path, "rb")  # noqa: SIM115 (closed below)
            table, start = headers[path]
            if list(table[name]["shape"]) != list(param.shape):
                raise LLMNotFound(f"{path}: '{name}' has shape {table[name]['shape']}, the model "
                                  f"built from config.json {list(param.shape)}")
            local, first = param, 0
            if isinstance(param, DTensor):
                local = param.to_local()
                _, offset = compute_local_shape_and_global_offset(
                    param.shape, param.device_mesh, param.placements)
                if any(offset[1:]):
                    raise NotImplementedError(f"{name}: only dim-0 shards are read ({param.placements})")
                first = offset[0] if param.dim() else 0
            if local.numel():
                with torch.no_grad():
                    _read_rows(handles[path], table[name], start, first, local)
    finally:
        for f in handles.values():
            f.close()


IDENTITY_FIELDS = ("model_type", "hidden_size", "vocab_size", "num_hidden_layers")


def llm_identity(path: str, llm) -> dict:
    """What must agree between the LLM a stage-1 adapter was trained for and stage 2's: the
    folder's or id's name (not the full path: clusters mount models in different places) and
    the architecture fields that decide whether the adapter's output space is the same."""
    cfg = llm.config
    return {"name": Path(str(path).rstrip("/")).name,
            **{k: getattr(cfg, k, None) for k in IDENTITY_FIELDS}}
