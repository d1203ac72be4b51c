"""Which reader made an index: checkpoint, a digest of its weights, and the BTR split settings."""

from __future__ import annotations

import hashlib
from dataclasses import asdict, dataclass, fields

import torch


class IncompatibleIndex(ValueError):
    """An index was built by another model, or with another split layer, hidden size or calibration."""


@dataclass(frozen=True)
class ReaderIdentity:
    """What an index records about its reader, and what a reader checks before reading it."""

    name: str
    weights_digest: str
    family: str
    split_layer: int
    hidden_size: int
    calibration: str

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "ReaderIdentity":
        return cls(**{f.name: data[f.name] for f in fields(cls)})

    def check_matches(self, index: "ReaderIdentity") -> None:
        """Raise IncompatibleIndex naming every setting in which ``index`` (the stored one) differs."""
        labels = {
            "weights_digest": "model weights",
            "split_layer": "split layer k",
            "hidden_size": "hidden size",
            "calibration": "calibration",
            "family": "reader family",
        }
        differences = [
            f"{label}: index {getattr(index, key)!r}, reader {getattr(self, key)!r}"
            for key, label in labels.items()
            if getattr(index, key) != getattr(self, key)
        ]
        if differences:
            raise IncompatibleIndex(
                f"the index was built by another reader ({index.name or 'unnamed'}); "
                + "; ".join(differences)
                + ". Rebuild the index with this reader, or load the reader it was built with."
            )


def weights_digest(module: torch.nn.Module) -> str:
    """sha256 over every parameter and buffer, in name order (dtype and shape included)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        data = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{data.dtype}:{tuple(data.shape)};".encode())
        digest.update(data.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
