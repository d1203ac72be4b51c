"""The split every reader shares: layers 1..k over passages alone, layers k+1..n over query + passage.

A family (T5 for FiD, BERT for extraction) supplies four hooks: how tokens are embedded, the
attention bias of a token batch, one encoder layer, and what follows the last layer. Everything
else, the three modes included, lives here once.

- ``baseline``: the unsplit encoder over query + passage text, the library's own forward;
- ``split``: continuous lower-layer states (DeFormer), no bits;
- ``btr``: passage states restored from 1-bit tokens: stored ones (BinaryTokens from the index)
  or, given text, computed in-graph with the straight-through sign so the reader can be trained.
"""

from __future__ import annotations

from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from storage.bits import BinaryTokens, unpack_bits
from storage.identity import ReaderIdentity, weights_digest
from storage.record import Passage

from .binary import binarize, restore, to_binary_batch
from .config import BTRConfig, check_mode
from .inputs import (
    ReaderInputError,
    TokenLayout,
    encode_passages,
    encode_question,
    pad,
    question_overflow,
)
from .merge import Tokens, bipartite_merge

PassageLike = Passage | BinaryTokens
PASSAGE_CACHE = 65_536  # tokenized text passages a reader keeps (least recently used dropped): ~35 MB at 128 tokens


@dataclass(frozen=True)
class Batch:
    """Questions with their passages, tokenized once (passages question-major)."""

    query_ids: list[list[int]]
    passage_ids: list[list[int]]
    passages: list[PassageLike]
    per_query: int
    retrieval: list[float] | None = None  # the retriever's score of each passage, when the caller has it

    @property
    def passage_width(self) -> int:
        return max(len(ids) for ids in self.passage_ids)


class SplitReader(nn.Module):
    """Base of both reader families; subclasses set ``self.model`` and implement the hooks below."""

    calibration: str  # "rms" (pre-norm) or "mean_abs" (post-norm)
    model_class: str  # the transformers class a checkpoint loads as (imported when one is loaded)

    def __init__(self, tokenizer, layout: TokenLayout, num_layers: int, config: BTRConfig) -> None:
        super().__init__()
        self.tokenizer = tokenizer
        self.layout = layout
        self.num_layers = num_layers
        self.config = config
        self.split_layer = config.resolve_split_layer(num_layers)
        # Training reads the same passages every epoch, and tokenizing a batch of them one by one took
        # 0.16 s a step at batch 128, on a GPU that waits for it: text passages are tokenized once.
        self._passage_tokens: OrderedDict[tuple[str, str, int], array] = OrderedDict()

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: BTRConfig | None = None, **kwargs):
        """Any checkpoint of the family by hub name or local path (kwargs go to ``from_pretrained``)."""
        import transformers

        model = getattr(transformers, cls.model_class).from_pretrained(name_or_path, **kwargs)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name_or_path, local_files_only=kwargs.get("local_files_only", False))
        return cls(model, tokenizer, config)

    @property
    def hidden_size(self) -> int:
        return self.model.config.hidden_size  # T5's config maps this name to d_model

    # ---- family hooks -------------------------------------------------------------------------

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, segment: str) -> Tokens:
        """Embeddings of query (segment "query") or passage ("passage") tokens, before layer 1."""
        raise NotImplementedError

    def _attention_bias(self, tokens: Tokens) -> torch.Tensor:
        """Additive self-attention bias for a token batch (padding and sizes folded in)."""
        raise NotImplementedError

    def _layer(self, index: int, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """One encoder layer (0-based index) of the wrapped model."""
        raise NotImplementedError

    def _finish(self, tokens: Tokens) -> Tokens:
        """What the encoder does after its last layer (T5: the final norm)."""
        return tokens

    def _at_split(self, batch: Batch, passages: Tokens) -> Tokens:
        """Passage states as the upper layers take them (a family may add query-aware features)."""
        return passages

    def identity(self) -> ReaderIdentity:
        """What an index built by this reader records (and what this reader checks when it opens one)."""
        return ReaderIdentity(
            name=str(getattr(self.model.config, "_name_or_path", "") or ""),
            weights_digest=weights_digest(self.model),
            family=type(self).__name__,
            split_layer=self.split_layer,
            hidden_size=self.hidden_size,
            calibration=self.calibration,
        )

    # ---- inputs -------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        """Token ids stay below this (the model's embedding rows, at least the tokenizer's size)."""
        return max(self.model.config.vocab_size, len(self.tokenizer))

    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def question_ids(self, question: str) -> list[int]:
        """Token ids of one question under this reader's layout and limit."""
        return encode_question(self.tokenizer, self.layout, question, self.config.max_query_tokens)

    def question_overflow(self, question: str) -> int:
        """Tokens of a question beyond this reader's limit, which ``question_ids`` cuts off."""
        return question_overflow(self.tokenizer, self.layout, question, self.config.max_query_tokens)

    def passage_ids(self, passage: PassageLike) -> list[int]:
        """Token ids of a passage: tokenized text, or the ids stored beside its bits."""
        if isinstance(passage, BinaryTokens):
            return passage.token_ids.tolist()
        return self._text_passage_ids([passage])[0]

    def _text_passage_ids(self, passages: Sequence[Passage]) -> list[list[int]]:
        """Token ids of text passages: those not seen lately tokenized in one call, the rest remembered."""
        limit = self.config.max_passage_tokens
        keys = [(p.title, p.text, limit) for p in passages]
        cache = self._passage_tokens
        missing = {key: p for key, p in zip(keys, passages) if key not in cache}
        if missing:
            for key, ids in zip(missing, encode_passages(self.tokenizer, self.layout, list(missing.values()), limit)):
                cache[key] = array("i", ids)
        ids = []
        for key in keys:
            cache.move_to_end(key)
            ids.append(cache[key].tolist())
        while len(cache) > PASSAGE_CACHE:
            cache.popitem(last=False)
        return ids

    def prepare(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]],
        retrieval: Sequence[Sequence[float]] | None = None,
    ) -> Batch:
        """Tokenize questions and their passages once; every mode reads the same passages.

        ``retrieval``: the retriever's score of each passage, which a reader may weigh in its answer.
        """
        if isinstance(questions, str):
            raise ReaderInputError("questions must be a list of strings, not one string")
        if len(questions) != len(passages) or not questions:
            raise ReaderInputError(f"{len(questions)} questions but {len(passages)} passage lists")
        counts = {len(group) for group in passages}
        if len(counts) != 1 or 0 in counts:
            raise ReaderInputError(f"every question needs the same, non-zero number of passages; got {sorted(counts)}")
        flat = [p for group in passages for p in group]
        kinds = {type(p) for p in flat}
        if len(kinds) != 1 or not kinds <= {Passage, BinaryTokens}:
            raise ReaderInputError("passages must be all Passage (text) or all BinaryTokens (from an index)")
        return Batch(
            query_ids=[self.question_ids(q) for q in questions],
            passage_ids=self._text_passage_ids(flat) if kinds == {Passage} else [self.passage_ids(p) for p in flat],
            passages=flat,
            per_query=counts.pop(),
            retrieval=None if retrieval is None else [float(x) for group in retrieval for x in group],
        )

    # ---- the split ----------------------------------------------------------------------------
    def run_layers(self, tokens: Tokens, layers: range, merge_ratio: float = 0.0) -> Tokens:
        """Run encoder layers over a token batch, merging ``merge_ratio`` before each layer."""
        bias = None
        for index in layers:
            if merge_ratio > 0:
                tokens = bipartite_merge(tokens, merge_ratio)
                bias = None
            if bias is None:
                bias = self._attention_bias(tokens)
            tokens = Tokens(self._layer(index, tokens.hidden, bias), tokens.size, tokens.position)
        return tokens

    def lower(self, ids: torch.Tensor, mask: torch.Tensor, segment: str = "passage") -> Tokens:
        """Layers 1..k over sequences alone: the part BTR runs offline for passages."""
        tokens = self._embed(ids.to(self.device), mask.to(self.device), segment)
        return self.run_layers(tokens, range(self.split_layer))

    def upper_by_length(self, query: Tokens, passages: Tokens, per_query: int, chunk_tokens: int = 8192) -> Tokens:
        """``upper`` without merging, the pairs run in chunks of similar passage length.

        The same states (padding is masked either way), far less padding: a batch pads every
        passage to its longest, and passage lengths vary several-fold. The query path uses it.
        """
        query = query.rows(torch.arange(query.hidden.shape[0], device=query.hidden.device).repeat_interleave(per_query))
        lengths = passages.size.sum(1).long()
        order = lengths.argsort(descending=True, stable=True)
        n, query_width = passages.hidden.shape[0], query.hidden.shape[1]
        width = query_width + passages.hidden.shape[1]
        hidden = query.hidden.new_zeros((n, width, query.hidden.shape[2]))
        size, position = query.size.new_zeros((n, width)), query.position.new_zeros((n, width))
        start = 0
        while start < n:
            longest = max(1, int(lengths[order[start]]))
            rows = order[start : start + max(1, chunk_tokens // (query_width + longest))]
            part = self.upper(query.rows(rows), passages.rows(rows, longest), 1)
            end = query_width + longest
            hidden[rows, :end], size[rows, :end], position[rows, :end] = part.hidden, part.size, part.position
            start += len(rows)
        return Tokens(hidden, size, position)

    def upper(self, query: Tokens, passages: Tokens, per_query: int, merge_ratio: float = 0.0) -> Tokens:
        """Layers k+1..n over [query; passage] for every (query, passage) pair: [B*n, N, d]."""
        query = query.rows(torch.arange(query.hidden.shape[0], device=query.hidden.device).repeat_interleave(per_query))
        # Relative positions continue after the query's real length, as in the unsplit input.
        shift = query.size.sum(1, keepdim=True)
        joined = Tokens(
            torch.cat([query.hidden, passages.hidden.to(query.hidden.dtype)], 1),
            torch.cat([query.size, passages.size], 1),
            torch.cat([query.position, passages.position + shift], 1),
        )
        return self._finish(self.run_layers(joined, range(self.split_layer, self.num_layers), merge_ratio))

    def encode_passages(self, passages: Sequence[Passage]) -> list[BinaryTokens]:
        """The offline half: tokenize, run layers 1..k, binarize and pack, one record per passage."""
        ids = encode_passages(self.tokenizer, self.layout, passages, self.config.max_passage_tokens)
        batch, mask = pad(ids, self.layout.pad_id)
        with torch.no_grad():
            hidden = self.lower(batch, mask).hidden.float().cpu()
        return to_binary_batch(batch, hidden, [len(seq) for seq in ids], self.split_layer, self.calibration)

    def restore_bits(self, stored: Sequence[BinaryTokens]) -> Tokens:
        """Float passage states from stored bits and scales, after checking they fit this reader."""
        for record in stored:
            record.check_compatible(self.split_layer, self.hidden_size, self.calibration)
        width = max(len(r) for r in stored)
        bits = torch.zeros((len(stored), width, self.hidden_size // 8), dtype=torch.uint8)
        scale = torch.zeros((len(stored), width), dtype=torch.float16)
        size = torch.zeros((len(stored), width))
        for i, record in enumerate(stored):
            n = len(record)
            bits[i, :n], scale[i, :n], size[i, :n] = record.bits, record.scale, 1.0
        bits, scale, size = bits.to(self.device), scale.to(self.device), size.to(self.device)
        hidden = restore(unpack_bits(bits, self.dtype), scale[..., None])
        position = torch.arange(width, device=self.device, dtype=torch.float32).expand(len(stored), -1)
        return Tokens(hidden, size, position)

    def passage_states(self, batch: Batch, mode: str) -> Tokens:
        """What the upper layers read for each passage in split or btr mode."""
        if mode == "btr" and isinstance(batch.passages[0], BinaryTokens):
            return self.restore_bits(batch.passages)  # type: ignore[arg-type]
        states = self.lower(*pad(batch.passage_ids, self.layout.pad_id))
        return self.binarized(states)[0] if mode == "btr" else states

    def binarized(self, states: Tokens) -> tuple[Tokens, torch.Tensor]:
        """Passage states as btr mode reads them (s * sign(h), straight-through), and the signs."""
        signs, scale = binarize(states.hidden, self.calibration)
        return Tokens(restore(signs, scale), states.size, states.position), signs

    def encoder_merge_ratio(self, mode: str) -> float:
        """Runtime token merging in the upper encoder layers for ``mode`` (none unless a family says so)."""
        return 0.0

    def encode_pairs(
        self, batch: Batch, mode: str = "btr", merge_ratio: float = 0.0, passages: Tokens | None = None
    ) -> Tokens:
        """Encoder output for every (question, passage) pair: [B*n, N, d].

        ``passages`` overrides the passage states of split/btr mode (training inspects them).
        """
        check_mode(mode)
        if mode == "baseline":
            if merge_ratio > 0:
                raise ValueError("the unsplit baseline does not merge tokens")
            return self._encode_unsplit(batch)
        query = self.lower(*pad(batch.query_ids, self.layout.pad_id), segment="query")
        passages = self._at_split(batch, self.passage_states(batch, mode) if passages is None else passages)
        if merge_ratio == 0 and not torch.is_grad_enabled():  # inference: skip the padding
            return self.upper_by_length(query, passages, batch.per_query)
        return self.upper(query, passages, batch.per_query, merge_ratio)

    def _encode_unsplit(self, batch: Batch) -> Tokens:
        """The baseline: the wrapped model's own encoder over query + passage, [B*n, N, d]."""
        raise NotImplementedError
