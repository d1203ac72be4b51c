"""What the extractive reader adds to the library's model: question-word match and passage relevance.

Both act where the upper layers start or end, so BTR's offline half stays query-agnostic:

- match: DrQA's exact-match feature (Chen et al. 2017). A passage token whose whole word (all its
  word pieces) is also a content word of the question gets one learned vector added to its state at
  the input of layer k+1, in every mode (the unsplit baseline too, at the same layer). The lower
  layers never see the question, so the bits stored offline do not change.
- relevance: one score per (question, passage) pair, the logsumexp of a linear score of each
  passage token's last-layer state, trained with a softmax over the question's passages (the DPR
  reader's passage selection), so the reader learns which passage answers, not only what an answer
  looks like.

Both start at zero (no effect until trained). They are saved as ``heads.safetensors`` beside the
model; a checkpoint without that file reads as before.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .inputs import QUERY_TEMPLATE, stopword_ids

HEADS_FILE = "heads.safetensors"


class ReaderHeads(nn.Module):
    """The match vector added at the split and the passage relevance head."""

    def __init__(self, hidden_size: int) -> None:
        super().__init__()
        self.match = nn.Parameter(torch.zeros(hidden_size))
        self.relevance = nn.Linear(hidden_size, 1)
        nn.init.zeros_(self.relevance.weight)
        nn.init.zeros_(self.relevance.bias)

    def save(self, folder: Path, dtype: torch.dtype | None = None) -> None:
        tensors = {name: t.detach().cpu().to(dtype or t.dtype).contiguous() for name, t in self.state_dict().items()}
        save_file(tensors, str(Path(folder) / HEADS_FILE))

    @classmethod
    def load(cls, folder: str | Path, hidden_size: int) -> "ReaderHeads | None":
        """The heads saved in ``folder``, or None for a checkpoint that has none."""
        path = Path(folder) / HEADS_FILE
        if not path.exists():
            return None
        heads = cls(hidden_size)
        heads.load_state_dict({name: t.float() for name, t in load_file(str(path)).items()})
        return heads


class QuestionMatch:
    """Which passage tokens belong to a word that is also a content word of the question."""

    def __init__(self, tokenizer) -> None:
        pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        self.continues = [str(p).startswith("##") for p in pieces]  # BERT word pieces inside a word
        template = tokenizer(QUERY_TEMPLATE.format(question=""), add_special_tokens=False)["input_ids"]
        self.ignored = stopword_ids(tokenizer) | set(template)  # "question :" is in every query

    def words(self, ids: Sequence[int]) -> list[tuple[int, ...]]:
        """For each position, the ids of the whole word it is part of."""
        spans, start = [], 0
        for at in range(1, len(ids) + 1):
            if at == len(ids) or not self._continues(ids[at]):
                spans.append((start, at))
                start = at
        out: list[tuple[int, ...]] = []
        for begin, end in spans:
            word = tuple(ids[begin:end])
            out += [word] * (end - begin)
        return out

    def _continues(self, token: int) -> bool:
        return 0 <= token < len(self.continues) and self.continues[token]

    def flags(self, question_ids: Sequence[int], passage_ids: Sequence[Sequence[int]], width: int) -> torch.Tensor:
        """1.0 where a passage token's word is a content word of the question: [len(passage_ids), width]."""
        wanted = {w for w in self.words(question_ids) if not (len(w) == 1 and w[0] in self.ignored)}
        out = torch.zeros(len(passage_ids), width)
        for row, ids in enumerate(passage_ids):
            for at, word in enumerate(self.words(ids)):
                if word in wanted:
                    out[row, at] = 1.0
        return out


__all__ = ["HEADS_FILE", "QuestionMatch", "ReaderHeads"]
