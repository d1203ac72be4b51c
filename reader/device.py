"""Where the query path runs: ``--device auto|cpu|cuda[:N]`` and ``--dtype auto|float32|bfloat16|float16``.

The flags are added without importing torch, so a command's ``--help`` stays instant; torch is
imported when a command resolves them, after parsing. ``auto``: the first CUDA GPU when torch sees
one, else the CPU; on a GPU bfloat16 where it computes it (float32 otherwise: T5 overflows in
float16), float32 on a CPU. The index's bits are unpacked on the device and the upper layers run
there; the weights are read once from the checkpoint and moved once.
"""

from __future__ import annotations

import argparse
import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

DTYPES = ("auto", "float32", "bfloat16", "float16")
_DEVICE = re.compile(r"auto|cpu|cuda(:\d+)?")


class DeviceUnavailable(ValueError):
    """A device the command was asked for and this machine does not have (bad input: exit status 2)."""


def device_name(text: str) -> str:
    """``text`` if it names a device these commands take (an argparse ``type``), else a one-line error."""
    if not _DEVICE.fullmatch(text):
        raise argparse.ArgumentTypeError(f"expected auto, cpu, cuda or cuda:N, got {text!r}")
    return text


def add_device_arguments(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` (both ``auto`` by default) for a command that runs a reader."""
    parser.add_argument("--device", type=device_name, default="auto", metavar="auto|cpu|cuda[:N]",
                        help="where the reader runs; auto: the first CUDA GPU if torch sees one, else the CPU "
                             "(default: %(default)s)")
    parser.add_argument("--dtype", choices=DTYPES, default="auto",
                        help="reader weights and activations; auto: bfloat16 on a GPU that computes it, else float32 "
                             "(default: %(default)s)")


def resolve(device: str = "auto", dtype: str = "auto") -> tuple[torch.device, torch.dtype]:
    """The torch device and dtype the flags name; DeviceUnavailable for a GPU this machine lacks."""
    import torch  # here, not at the top: the commands parse their flags (and --help) before paying for torch

    device_name(device)
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    resolved = torch.device(device)
    if resolved.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise DeviceUnavailable(f"--device {device}: torch sees no CUDA GPU here (torch {torch.__version__}); "
                                    "use --device cpu")
        if (resolved.index or 0) >= count:
            raise DeviceUnavailable(f"--device {device}: torch sees {count} CUDA GPU(s), numbered 0 to {count - 1}")
    if dtype == "auto":
        dtype = "float32" if resolved.type == "cpu" else "bfloat16" if torch.cuda.is_bf16_supported() else "float32"
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; expected one of {', '.join(DTYPES)}")
    return resolved, getattr(torch, dtype)
