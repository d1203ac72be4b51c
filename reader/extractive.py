"""Extractive BTR reader over a BERT-family encoder with a span head.

Wraps ``transformers``' AutoModelForQuestionAnswering (for BERT: BertForQuestionAnswering, whose
``qa_outputs`` is the span head). Query tokens take positions 0.. and token type 0; passage tokens
take positions from ``max_query_tokens`` on and token type 1, in every mode, so a passage's lower
layers never depend on the query that will read it. No runtime merging: spans must point at exact
tokens.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from storage.bits import BinaryTokens
from storage.identity import weights_digest
from storage.record import Passage

from .config import BTRConfig, check_mode
from .heads import QuestionMatch, ReaderHeads
from .inputs import PASSAGE_TEMPLATE, TokenLayout, pad, passage_string, tokenize_passage
from .merge import Tokens
from .normalize import normalize_answer
from .split import Batch, PassageLike, SplitReader

# Spans weighed per question when picking the answer string (1 = the single best span). On held-out
# dev (NQ + TriviaQA, 771 questions, the committed reader, k = 5) 20 raised EM from 4.9 to 6.1 on the
# r_o = 0.2 index (14 questions won, 5 lost) and from 6.4 to 7.3 lossless; 50 and 100 added one
# question on one index and cost speed.
ANSWER_POOL = 20


@dataclass(frozen=True)
class Span:
    """The best answer span for one question: which passage, which tokens, its score and text."""

    passage: int
    start: int
    end: int  # inclusive
    score: float
    text: str


class ExtractiveReader(SplitReader):
    """BERT-family reader that picks the best span across all retrieved passages."""

    calibration = "mean_abs"
    model_class = "AutoModelForQuestionAnswering"  # a plain encoder checkpoint gets a fresh span head

    def __init__(
        self, model, tokenizer, config: BTRConfig | None = None, max_answer_tokens: int = 30, pool: int = ANSWER_POOL
    ) -> None:
        config = config or BTRConfig()
        base = model.base_model
        if not (hasattr(base, "embeddings") and hasattr(base, "encoder") and hasattr(base.encoder, "layer")):
            raise TypeError(f"{type(model).__name__} is not a BERT-family model with embeddings and encoder.layer")
        if not hasattr(model, "qa_outputs"):
            raise TypeError(f"{type(model).__name__} has no span head (qa_outputs)")
        cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
        layout = TokenLayout((cls,), (sep,), (sep,), tokenizer.pad_token_id)
        super().__init__(tokenizer, layout, model.config.num_hidden_layers, config)
        needed = config.max_query_tokens + config.max_passage_tokens
        if needed > model.config.max_position_embeddings:
            raise ValueError(
                f"max_query_tokens + max_passage_tokens = {needed} exceeds the model's "
                f"{model.config.max_position_embeddings} positions"
            )
        self.model = model
        self.max_answer_tokens = max_answer_tokens
        before_title, after_title = PASSAGE_TEMPLATE.split("{title}")
        marks = (before_title, after_title.split("{text}")[0])  # "title:", " context:"
        self._marks = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in marks]
        self.pool = pool
        self.heads: ReaderHeads | None = None  # question-word match and passage relevance (reader.heads)
        self._matcher: QuestionMatch | None = None
        # How much the passage's relevance (log-softmax over the question's passages) and the
        # retriever's score weigh in each span's score; chosen on held-out dev, kept in btr.json.
        self.relevance_weight = 0.0
        self.retrieval_weight = 0.0
        # The pool's candidates often share a passage: tokenize each once (answer.py asks again to cite).
        self._offset_mapping = functools.lru_cache(maxsize=256)(self._tokenize_offsets)

    @property
    def pool(self) -> int:
        """Spans weighed per question when picking the answer string (see ``best_spans``)."""
        return self._pool

    @pool.setter
    def pool(self, value: int) -> None:
        if value < 1:
            raise ValueError(f"pool must be at least 1 (the single best span), not {value}")
        self._pool = value

    @classmethod
    def from_pretrained(cls, name_or_path: str, config: BTRConfig | None = None, **kwargs):
        """The checkpoint's model and tokenizer, and its heads where it has them (``heads.safetensors``)."""
        reader = super().from_pretrained(name_or_path, config, **kwargs)
        if Path(name_or_path).is_dir():
            reader.attach_heads(ReaderHeads.load(name_or_path, reader.hidden_size))
        return reader

    @classmethod
    def light(cls, path: str, config: BTRConfig | None = None, dtype: torch.dtype | None = None) -> "ExtractiveReader | None":
        """``from_pretrained``'s reader without transformers' model classes (``reader.bert``: the same weights and
        outputs), or None where those do not apply exactly: then ``from_pretrained``."""
        from .bert import load_light

        loaded = load_light(path, "qa", dtype)
        if loaded is None:
            return None
        reader = cls(*loaded, config)
        reader.attach_heads(ReaderHeads.load(path, reader.hidden_size))
        return reader

    def attach_heads(self, heads: ReaderHeads | None) -> None:
        """Use ``heads`` (None: read as a reader without them); a fresh set for training is ``ReaderHeads(d)``."""
        self.heads = None if heads is None else heads.to(self.device)

    def identity(self):
        """As ``SplitReader.identity``, with the heads in the weights digest (they change the answers)."""
        identity = super().identity()
        if self.heads is None:
            return identity
        return replace(identity, weights_digest=weights_digest(self))

    # ---- question-word match and passage relevance (reader.heads) ------------------------------
    def match_flags(self, batch: Batch, width: int) -> torch.Tensor:
        """[B*n, width]: 1 where a passage token's word is a content word of its question."""
        if self._matcher is None:
            self._matcher = QuestionMatch(self.tokenizer)
        n = batch.per_query
        rows = [
            self._matcher.flags(question, batch.passage_ids[q * n : (q + 1) * n], width)
            for q, question in enumerate(batch.query_ids)
        ]
        return torch.cat(rows).to(self.device)

    def _at_split(self, batch: Batch, passages: Tokens) -> Tokens:
        if self.heads is None:
            return passages
        flags = self.match_flags(batch, passages.hidden.shape[1])
        hidden = passages.hidden + flags[..., None].to(passages.hidden.dtype) * self.heads.match.to(passages.hidden.dtype)
        return Tokens(hidden, passages.size, passages.position)

    def relevance_logits(self, batch: Batch, pairs: Tokens) -> torch.Tensor | None:
        """[B, n]: how well each passage answers its question; None without heads.

        Each passage token's final state scores the passage (one linear map), and the passage's
        score is their logsumexp: evidence anywhere in the passage counts, and a token that shares a
        word with the question can carry it directly. (A score read from [CLS] alone did not learn
        in 170 steps: the loss stayed at log n.)
        """
        if self.heads is None:
            return None
        width = batch.passage_width
        scores = self.heads.relevance(pairs.hidden[:, -width:].float())[..., 0]
        scores = scores.masked_fill(pairs.size[:, -width:] == 0, float("-inf")).logsumexp(-1)
        return scores.reshape(len(batch.query_ids), batch.per_query)

    def passage_prior(self, batch: Batch, relevance: torch.Tensor | None) -> torch.Tensor | None:
        """[B*n]: what each passage adds to the scores of its spans, or None for nothing.

        ``relevance_weight`` x the log-softmax of ``relevance_logits`` over the question's passages,
        plus ``retrieval_weight`` x the retriever's score of the passage (when the batch has it).
        """
        prior = torch.zeros(len(batch.passage_ids))
        if relevance is not None and self.relevance_weight:
            prior += self.relevance_weight * relevance.float().cpu().log_softmax(-1).reshape(-1)
        if batch.retrieval is not None and self.retrieval_weight:
            prior += self.retrieval_weight * torch.tensor(batch.retrieval)
        return prior if prior.any() else None

    # ---- encoder hooks ------------------------------------------------------------------------
    def _positions(self, width: int, segment: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Absolute position ids and token types [1, width] for a query or passage segment."""
        offset, kind = (0, 0) if segment == "query" else (self.config.max_query_tokens, 1)
        if self.model.config.type_vocab_size < 2:
            kind = 0
        position = torch.arange(offset, offset + width, device=self.device)[None]
        return position, torch.full_like(position, kind)

    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, segment: str) -> Tokens:
        position, types = self._positions(ids.shape[1], segment)
        position, types = position.expand_as(ids), types.expand_as(ids)
        hidden = self.model.base_model.embeddings(input_ids=ids, token_type_ids=types, position_ids=position)
        return Tokens(hidden, mask.float(), position.float())

    def _attention_bias(self, tokens: Tokens) -> torch.Tensor:
        return tokens.key_bias()

    def _layer(self, index: int, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.model.base_model.encoder.layer[index](hidden, attention_mask=bias)

    def _encode_unsplit(self, batch: Batch, attention_from: int | None = None) -> Tokens:
        """The library's own forward over [query block; passage block], same positions as the split.

        With ``attention_from`` = j, also returns the attention probabilities [B*n, N, N] averaged
        over heads and layers j.. (the model must run eager attention; training's teacher does).
        """
        query, query_mask = pad(batch.query_ids, self.layout.pad_id)
        passage, passage_mask = pad(batch.passage_ids, self.layout.pad_id)
        n = batch.per_query
        ids = torch.cat([query.repeat_interleave(n, 0), passage], 1).to(self.device)
        mask = torch.cat([query_mask.repeat_interleave(n, 0), passage_mask], 1).to(self.device)
        query_pos, query_type = self._positions(query.shape[1], "query")
        passage_pos, passage_type = self._positions(passage.shape[1], "passage")
        position = torch.cat([query_pos, passage_pos], 1).expand_as(ids)
        types = torch.cat([query_type, passage_type], 1).expand_as(ids)
        hook = None
        if self.heads is not None:  # the match vector enters where the split reader's upper layers start
            added = self.match_flags(batch, passage.shape[1])[..., None] * self.heads.match
            added = torch.cat([added.new_zeros((added.shape[0], query.shape[1], added.shape[2])), added], 1)
            layer = self.model.base_model.encoder.layer[self.split_layer]
            hook = layer.register_forward_pre_hook(lambda _, args: (args[0] + added.to(args[0].dtype), *args[1:]))
        try:
            output = self.model.base_model(
                input_ids=ids,
                attention_mask=mask,
                token_type_ids=types,
                position_ids=position,
                output_attentions=attention_from is not None,
            )
        finally:
            if hook is not None:
                hook.remove()
        tokens = Tokens(output.last_hidden_state, mask.float(), position.float())
        if attention_from is None:
            return tokens
        attention = torch.stack(output.attentions[attention_from:]).mean(dim=(0, 2))
        return tokens, attention

    # ---- spans --------------------------------------------------------------------------------
    def span_logits(
        self, batch: Batch, mode: str = "btr", pairs: Tokens | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Start and end logits [B*n, Lp] over passage tokens; -inf where no answer may start or end.

        ``pairs`` is the encoder output when the caller already has it (training).
        """
        check_mode(mode)
        pairs = self.encode_pairs(batch, mode) if pairs is None else pairs
        width = batch.passage_width
        logits = self.model.qa_outputs(pairs.hidden[:, -width:]).float()
        lengths = torch.tensor([len(ids) - len(self.layout.passage_suffix) for ids in batch.passage_ids])
        allowed = (torch.arange(width)[None] < lengths[:, None]) & ~self.template_tokens(batch.passage_ids, width)
        logits = logits.masked_fill(~allowed.to(logits.device)[..., None], float("-inf"))
        return logits[..., 0], logits[..., 1]

    def template_tokens(self, passage_ids: Sequence[list[int]], width: int) -> torch.Tensor:
        """Where each passage's template words are ("title :", "context :"): a mask [n, width].

        An answer never holds them (``best_spans`` keeps spans off every position ruled out here, so
        none runs from the title into the text: "Martin Scorsese context: Martin Charles Scorsese").
        """
        template = torch.zeros(len(passage_ids), width, dtype=torch.bool)
        (title_mark, text_mark) = self._marks
        for row, ids in enumerate(passage_ids):
            if ids[: len(title_mark)] != title_mark:
                continue
            template[row, : len(title_mark)] = True
            for at in range(len(title_mark), len(ids) - len(text_mark) + 1):
                if ids[at : at + len(text_mark)] == text_mark:
                    template[row, at : at + len(text_mark)] = True
                    break
        return template

    def extract(
        self, questions: Sequence[str], passages: Sequence[Sequence[PassageLike]], mode: str = "btr"
    ) -> list[Span]:
        """The best span per question across all its passages (score = start + end logit)."""
        batch = self.prepare(questions, passages)
        with torch.no_grad():
            return self.read_out(batch, self.encode_pairs(batch, mode), mode)

    def read_out(self, batch: Batch, pairs: Tokens, mode: str) -> list[Span]:
        """The query path's last stage: spans from encoder output the caller already has."""
        prior = self.passage_prior(batch, self.relevance_logits(batch, pairs))
        return self.best_spans(batch, *self.span_logits(batch, mode, pairs), prior)

    def best_spans(
        self, batch: Batch, start: torch.Tensor, end: torch.Tensor, prior: torch.Tensor | None = None
    ) -> list[Span]:
        """The best span per question across all its passages, from ``span_logits``' start and end [B*n, Lp].

        A span never holds a position where no answer may start or end (the template's words). With ``pool`` > 1 the answer is the string, not the span: the ``pool`` highest-scoring spans
        of a question are weighed by their probability (softmax of start + end logits, which training
        normalizes over all of a question's passages) and the spans that read the same after SQuAD
        normalization add up; the most probable string wins, cited by its best span. This is the
        decision rule that fits the marginal likelihood the reader is trained with (every
        occurrence of the answer counts), where the single best span ignores all but one.
        """
        questions = batch.query_ids
        width = start.shape[1]
        scores = start[:, :, None] + end[:, None, :]  # [B*n, Lp(start), Lp(end)]
        if prior is not None:  # the passage's own evidence, shared by all its spans
            scores = scores + prior.to(scores.device)[:, None, None]
        offset = torch.arange(width, device=scores.device)
        gap = offset[None, :] - offset[:, None]
        ruled_out = (torch.isinf(start) & torch.isinf(end)).cumsum(1)  # ruled-out positions up to each token
        holds_one = ruled_out[:, None, :] > ruled_out[:, :, None]  # one lies after the start, up to the end
        scores = scores.masked_fill((gap < 0) | (gap >= self.max_answer_tokens) | holds_one, float("-inf"))
        flat = scores.reshape(len(questions), -1)
        top = flat.topk(min(self.pool, flat.shape[1]), dim=-1)
        spans = []
        for q, (values, indices) in enumerate(zip(top.values.tolist(), top.indices.tolist())):
            candidates = []
            for score, where in zip(values, indices):
                if score == float("-inf") and candidates:
                    break
                passage, rest = divmod(where, width * width)
                first, last = divmod(rest, width)
                index = q * batch.per_query + passage
                text = self.span_text(batch.passages[index], batch.passage_ids[index], first, last)
                candidates.append(Span(passage, first, last, score, text))
            spans.append(candidates[0] if len(candidates) == 1 else most_probable_answer(candidates))
        return spans

    def span_text(self, passage: PassageLike, ids: list[int], start: int, end: int) -> str:
        """The answer text: a slice of the passage string where there is text, else decoded tokens."""
        if isinstance(passage, BinaryTokens):
            return self.tokenizer.decode(ids[start : end + 1]).strip()
        return passage_string(passage)[slice(*self.span_offsets(passage, start, end))]

    def span_offsets(self, passage: Passage, start: int, end: int) -> tuple[int, int]:
        """Character offsets [first, last) in ``passage_string(passage)`` of tokens start..end (inclusive)."""
        offsets = self._offset_mapping(passage)
        return offsets[start][0], offsets[end][1]

    def _tokenize_offsets(self, passage: Passage) -> list[tuple[int, int]]:
        return tokenize_passage(self.tokenizer, self.layout, passage, self.config.max_passage_tokens, offsets=True)[
            "offset_mapping"
        ]


def most_probable_answer(candidates: Sequence[Span]) -> Span:
    """The best-scoring span of the answer string whose candidate spans hold the most probability."""
    weights = torch.tensor([c.score for c in candidates]).softmax(0).tolist()
    keys = [normalize_answer(c.text) for c in candidates]
    mass: dict[str, float] = {}
    for key, weight in zip(keys, weights):
        mass[key] = mass.get(key, 0.0) + weight
    best = max(mass, key=mass.get)  # first reached wins a tie: the higher-scoring string
    return candidates[keys.index(best)]


__all__ = ["ExtractiveReader", "Passage", "Span", "most_probable_answer"]
