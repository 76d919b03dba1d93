"""Where tensors live: one device choice for every tensor op, and its autocast policy."""

from __future__ import annotations

import contextlib

import torch

DEVICE_PREFERENCES = ("auto", "cpu", "cuda", "cuda:N", "mps")


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def resolve_device(preference: str | torch.device = "auto") -> torch.device:
    """Turn a device preference into a usable torch.device.

    "auto" picks CUDA, then MPS, then CPU. "cpu", "cuda", "cuda:N" and "mps" are honoured
    as asked, and raise RuntimeError naming the preference when that device is not usable
    here; any other string raises ValueError listing the accepted forms.
    """
    text = str(preference).strip().lower()
    if text == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    if text == "cpu":
        return torch.device("cpu")
    if text == "mps":
        if not _mps_available():
            raise RuntimeError(
                "device preference 'mps' cannot be used: torch.backends.mps.is_available() is False "
                "on this machine; set the device to 'auto' or 'cpu'."
            )
        return torch.device("mps")
    if text == "cuda" or text.startswith("cuda:"):
        index_text = text.partition(":")[2]
        if index_text and not index_text.isdigit():
            raise ValueError(
                f"device preference {preference!r} is not a device: expected one of {DEVICE_PREFERENCES}."
            )
        if not torch.cuda.is_available():
            built_with = torch.version.cuda or "none (CPU-only build)"
            raise RuntimeError(
                f"device preference {preference!r} cannot be used: torch.cuda.is_available() is False "
                f"(torch {torch.__version__}, CUDA runtime {built_with}); set the device to 'auto' or 'cpu', "
                "or install a CUDA build of torch."
            )
        if index_text:
            index = int(index_text)
            count = torch.cuda.device_count()
            if index >= count:
                raise RuntimeError(
                    f"device preference {preference!r} cannot be used: this machine has {count} CUDA "
                    f"device(s), indices 0..{count - 1}; pick one of those or 'auto'."
                )
            return torch.device("cuda", index)
        return torch.device("cuda")
    raise ValueError(f"device preference {preference!r} is not a device: expected one of {DEVICE_PREFERENCES}.")


def autocast_for(device: torch.device) -> contextlib.AbstractContextManager:
    """Mixed-precision context for forward passes on `device`.

    bf16 autocast on CUDA devices that support bf16; a no-op context elsewhere (CPU, MPS, and
    older GPUs, where fp16 would need a gradient scaler we do not run).
    """
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.autocast(device_type="cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()
