"""Device selection shared by the extraction and the trainer."""

from __future__ import annotations

import contextlib

import torch


class DeviceUnavailable(ValueError):
    pass


def pick_device(name: str, local_rank: int | None = None, key: str = "device") -> torch.device:
    """'auto' is CUDA when present; a bare 'cuda' under torchrun means this rank's GPU."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise DeviceUnavailable(f"{key}={name}, but this machine has no usable CUDA device "
                                f"(torch {torch.__version__}, CUDA build {torch.version.cuda}); "
                                f"use {key}=auto or cpu")
    if name == "cuda" and local_rank is not None:
        return torch.device("cuda", local_rank)
    return torch.device(name)


def autocast(device: torch.device):
    """bf16 autocast on a GPU (extraction's encoder, the trainer's step); nothing on CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
