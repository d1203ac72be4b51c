"""Fusion-in-Decoder over T5, split at layer k, with cross-passage token merging in the decoder.

Wraps ``transformers``' T5ForConditionalGeneration: its blocks, norms and heads are called as they
are, never copied. Each (question, passage) pair is encoded alone, the encoder outputs of all of a
question's passages are concatenated, and the decoder reads them all.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import T5ForConditionalGeneration
from transformers.cache_utils import DynamicCache, EncoderDecoderCache

from .config import NO_MERGE, BTRConfig, RuntimeMerge
from .inputs import TokenLayout, pad
from .merge import Tokens, bipartite_merge
from .split import Batch, PassageLike, SplitReader


def _end_token(tokenizer) -> int:
    end = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.sep_token_id
    if end is None:
        raise ValueError("the tokenizer has neither an end-of-sequence nor a separator token")
    return end


@dataclass(frozen=True)
class Generated:
    """A generated answer and its citation: the passage its tokens attended to most."""

    text: str
    passage: int  # index among the question's passages
    attention: tuple[float, ...]  # share of the answer's cross-attention each passage received


class FiDReader(SplitReader):
    """Generative BTR reader: T5 encoder split at k, FiD decoder."""

    calibration = "rms"
    model_class = "T5ForConditionalGeneration"
    heads = None  # the extractive reader's optional heads have no FiD counterpart

    def __init__(self, model: T5ForConditionalGeneration, tokenizer, config: BTRConfig | None = None) -> None:
        config = config or BTRConfig()
        layout = TokenLayout((), (), (_end_token(tokenizer),), model.config.pad_token_id)
        super().__init__(tokenizer, layout, model.config.num_layers, config)
        self.model = model

    # ---- encoder hooks ------------------------------------------------------------------------
    def _embed(self, ids: torch.Tensor, mask: torch.Tensor, segment: str) -> Tokens:
        encoder = self.model.encoder
        position = torch.arange(ids.shape[1], device=ids.device, dtype=torch.float32).expand(ids.shape[0], -1)
        return Tokens(encoder.dropout(encoder.embed_tokens(ids)), mask.float(), position)

    def _attention_bias(self, tokens: Tokens) -> torch.Tensor:
        """T5's relative-position bias from token positions (merged tokens sit at their mean)."""
        attention = self.model.encoder.block[0].layer[0].SelfAttention
        relative = (tokens.position[:, None, :] - tokens.position[:, :, None]).round().long()
        buckets = attention._relative_position_bucket(
            relative,
            bidirectional=True,
            num_buckets=attention.relative_attention_num_buckets,
            max_distance=attention.relative_attention_max_distance,
        )
        bias = attention.relative_attention_bias(buckets).permute(0, 3, 1, 2)
        return bias.to(tokens.hidden.dtype) + tokens.key_bias()

    def _layer(self, index: int, hidden: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        return self.model.encoder.block[index](hidden, attention_mask=None, position_bias=bias)[0]

    def _finish(self, tokens: Tokens) -> Tokens:
        encoder = self.model.encoder
        return Tokens(encoder.dropout(encoder.final_layer_norm(tokens.hidden)), tokens.size, tokens.position)

    def _encode_unsplit(self, batch: Batch, attention_from: int | None = None) -> Tokens:
        """The library's encoder over each query + passage, laid out as the split reader's output.

        Rows are [query block padded to the longest query; passage block], so teacher and student
        states line up token for token. With ``attention_from`` = j, also the attention
        probabilities [B*n, N, N] in that layout, averaged over heads and layers j.. (eager attention).
        """
        queries = [batch.query_ids[i // batch.per_query] for i in range(len(batch.passage_ids))]
        ids, mask = pad([q + p for q, p in zip(queries, batch.passage_ids)], self.layout.pad_id)
        output = self.model.encoder(
            input_ids=ids.to(self.device), attention_mask=mask.to(self.device), output_attentions=attention_from is not None
        )
        query_width = max(len(q) for q in batch.query_ids)
        index = torch.zeros((len(queries), query_width + batch.passage_width), dtype=torch.long)
        size = torch.zeros(index.shape)
        for row, (query, passage) in enumerate(zip(queries, batch.passage_ids)):
            index[row, : len(query)] = torch.arange(len(query))
            index[row, query_width : query_width + len(passage)] = torch.arange(len(query), len(query) + len(passage))
            size[row, : len(query)] = size[row, query_width : query_width + len(passage)] = 1.0
        index = index.to(self.device)
        hidden = output.last_hidden_state.gather(1, index[..., None].expand(-1, -1, output.last_hidden_state.shape[-1]))
        tokens = Tokens(hidden, size.to(self.device), index.float())  # a token's position is its input index
        if attention_from is None:
            return tokens
        if not output.attentions or len(output.attentions) <= attention_from:
            raise RuntimeError("the encoder returned no attention weights (sdpa attention?); call reader.train.eager_attention first")
        attention = torch.stack(output.attentions[attention_from:]).mean(dim=(0, 2))
        attention = attention.gather(1, index[..., None].expand(-1, -1, attention.shape[-1]))
        return tokens, attention.gather(2, index[:, None, :].expand(-1, index.shape[1], -1))

    # ---- FiD ------------------------------------------------------------------------------------
    def encode(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]],
        mode: str = "btr",
        merge: RuntimeMerge | None = None,
    ) -> Tokens:
        """The fused memory the decoder reads: [B, n*N, d], one row per question."""
        merge = merge if merge is not None else self.config.merge_for(mode)
        batch = self.prepare(questions, passages)
        return self.encode_pairs(batch, mode, merge.encoder_ratio).flatten_groups(batch.per_query)

    def decoder_memories(self, memory: Tokens, merge: RuntimeMerge) -> list[Tokens]:
        """The memory each decoder layer cross-attends to, shrinking by cross-passage merges."""
        memories = []
        for layer in range(len(self.model.decoder.block)):
            if merge.decoder_merges_before(layer):
                memory = bipartite_merge(memory, merge.decoder_ratio)
            memories.append(memory)
        return memories

    def _decode(self, ids: torch.Tensor, memories: list[Tokens], self_mask, cache) -> torch.Tensor:
        """Decoder hidden states for ``ids`` given per-layer memories, then the LM head's logits."""
        decoder = self.model.decoder
        hidden = decoder.dropout(decoder.embed_tokens(ids))
        position_bias = None  # block 0 computes T5's relative bias; the others reuse it
        for block, memory in zip(decoder.block, memories):
            hidden, position_bias, _ = block(
                hidden,
                attention_mask=self_mask,
                position_bias=position_bias,
                encoder_hidden_states=memory.hidden,
                encoder_attention_mask=memory.key_bias(),
                cache=cache,
            )
        hidden = decoder.dropout(decoder.final_layer_norm(hidden))
        if self.model.config.scale_decoder_outputs:
            hidden = hidden * (self.model.config.d_model**-0.5)
        return self.model.lm_head(hidden)

    def decoder_logits(self, memory: Tokens, decoder_input_ids: torch.Tensor, merge: RuntimeMerge) -> torch.Tensor:
        """Teacher-forced logits [B, T, V] (training and comparisons)."""
        length = decoder_input_ids.shape[1]
        causal = torch.full((length, length), torch.finfo(memory.hidden.dtype).min, device=memory.hidden.device)
        causal = causal.triu(1)[None, None]
        return self._decode(decoder_input_ids.to(self.device), self.decoder_memories(memory, merge), causal, None)

    def answer_labels(self, answers: Sequence[str], max_tokens: int = 20) -> torch.Tensor:
        """Token ids [B, T] of each answer and the end token, cut to ``max_tokens``, padded with -100."""
        end = self.layout.passage_suffix[0]
        ids = [self.tokenizer(a, add_special_tokens=False)["input_ids"][: max_tokens - 1] + [end] for a in answers]
        labels = torch.full((len(ids), max(map(len, ids))), -100, dtype=torch.long)
        for row, sequence in enumerate(ids):
            labels[row, : len(sequence)] = torch.tensor(sequence)
        return labels

    def loss(self, memory: Tokens, labels: torch.Tensor, merge: RuntimeMerge) -> torch.Tensor:
        """Cross-entropy of answer token ids ``labels`` [B, T] (-100 = ignored)."""
        labels = labels.to(self.device)
        logits = self.decoder_logits(memory, self.model._shift_right(labels), merge)
        return torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100)

    @torch.no_grad()
    def generate(
        self, memory: Tokens, merge: RuntimeMerge, max_new_tokens: int = 20, stop_at_eos: bool = True
    ) -> torch.Tensor:
        """Greedy decoding with cached self- and cross-attention keys; ids [B, T] without the start token."""
        config = self.model.config
        memories = self.decoder_memories(memory, merge)
        cache = EncoderDecoderCache(DynamicCache(config=config), DynamicCache(config=config))
        batch = memory.hidden.shape[0]
        ids = torch.full((batch, 1), config.decoder_start_token_id, dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        end = self.layout.passage_suffix[0]
        for _ in range(max_new_tokens):
            logits = self._decode(ids[:, -1:], memories, None, cache)[:, -1]
            token = logits.argmax(-1).masked_fill(done, config.pad_token_id)
            ids = torch.cat([ids, token[:, None]], 1)
            done |= token == end
            if stop_at_eos and bool(done.all()):
                break
        return ids[:, 1:]

    def answer(
        self,
        questions: Sequence[str],
        passages: Sequence[Sequence[PassageLike]],
        mode: str = "btr",
        max_new_tokens: int = 20,
        merge: RuntimeMerge | None = None,
    ) -> list[str]:
        """Answers, one per question, from its passages (text, or bits from an index).

        ``merge``: runtime merging to use instead of the config's (btr mode's ratios are swept so).
        """
        merge = merge if merge is not None else self.config.merge_for(mode)
        batch = self.prepare(questions, passages)
        with torch.no_grad():
            pairs = self.encode_pairs(batch, mode, merge.encoder_ratio)
            return [g.text for g in self.read_out(batch, pairs, mode, max_new_tokens, merge)]

    def encoder_merge_ratio(self, mode: str) -> float:
        return self.config.merge_for(mode).encoder_ratio

    def read_out(
        self, batch: Batch, pairs: Tokens, mode: str, max_new_tokens: int = 20, merge: RuntimeMerge | None = None
    ) -> list[Generated]:
        """The query path's last stage: fuse each question's passages, generate its answer, cite."""
        merge = merge if merge is not None else self.config.merge_for(mode)
        memory = pairs.flatten_groups(batch.per_query)
        ids = self.generate(memory, merge, max_new_tokens)
        shares = self.passage_attention(memory, ids, batch.per_query)
        texts = self.tokenizer.batch_decode(ids, skip_special_tokens=True)
        return [
            Generated(text.strip(), int(share.argmax()), tuple(round(float(x), 4) for x in share))
            for text, share in zip(texts, shares)
        ]

    @torch.no_grad()
    def passage_attention(self, memory: Tokens, ids: torch.Tensor, per_query: int) -> torch.Tensor:
        """Each passage's share [B, n] of the cross-attention the answer tokens pay in the last decoder layer.

        One teacher-forced pass over the generated ids against the unmerged memory (cross-passage
        merging mixes passages, so its tokens have no single source); heads averaged, positions
        after the end token left out.
        """
        config = self.model.config
        start = torch.full((ids.shape[0], 1), config.decoder_start_token_id, dtype=torch.long, device=ids.device)
        inputs = torch.cat([start, ids[:, :-1]], 1)
        attention = self.model.decoder.block[-1].layer[1].EncDecAttention
        seen: list[torch.Tensor] = []
        hook = attention.register_forward_pre_hook(lambda _, args, kwargs: seen.append(args[0]), with_kwargs=True)
        try:
            self.decoder_logits(memory, inputs, NO_MERGE)
        finally:
            hook.remove()
        heads, width = attention.n_heads, attention.key_value_proj_dim
        query = attention.q(seen[0]).unflatten(-1, (heads, width)).transpose(1, 2)  # [B, h, T, w]
        key = attention.k(memory.hidden).unflatten(-1, (heads, width)).transpose(1, 2)  # [B, h, M, w]
        probs = (query @ key.transpose(-1, -2) + memory.key_bias()).float().softmax(-1).mean(1)  # T5: no 1/sqrt(w)
        ended = torch.cat([torch.zeros_like(ids[:, :1], dtype=torch.bool), (ids == self.layout.passage_suffix[0])[:, :-1]], 1)
        live = ~ended.cumsum(1).bool()  # the positions up to and including the end token's prediction
        received = (probs * live[..., None]).sum(1)  # [B, M]
        share = received.reshape(received.shape[0], per_query, -1).sum(-1)
        return share / share.sum(-1, keepdim=True).clamp_min(1e-9)
