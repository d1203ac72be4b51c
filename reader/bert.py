"""BERT for the query path without transformers' model classes: what a cold question pays for (issue 43).

``from transformers import BertModel`` took 2.7 s of a 6.3 s cold ``reader.answer`` on this machine (its
model-loading machinery imports torch.distributed, generation and kernel hubs), and the tokenizer's
import another second, for six layers of matrix products. Here the same modules, under the same
parameter names, are built from a checkpoint's ``config.json`` and ``model.safetensors`` and compute
what transformers' BERT computes on a CPU (its SDPA attention, the same operations in the same order);
the tokenizer is the checkpoint's ``tokenizer.json`` through the ``tokenizers`` library that
transformers' fast tokenizers wrap. ``tests/test_light.py`` compares both with transformers' own on the
default reader and retriever: outputs, answers, tokenization over the whole bundled sample, weights digests.

They apply only where they are exact (``load_bert``, ``LightTokenizer.load``: a local BERT checkpoint,
absolute positions, GELU, every weight present and no other, a WordPiece ``tokenizer.json`` that agrees
with its config); anything else loads through transformers, as training and indexing always do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import torch
from torch import nn

from .inputs import splits_words_alone

WEIGHTS = "model.safetensors"
CONFIG = "config.json"
# config.json fields transformers' BertConfig defaults when a checkpoint leaves them out
_DEFAULTS = {"layer_norm_eps": 1e-12, "hidden_dropout_prob": 0.1, "attention_probs_dropout_prob": 0.1, "type_vocab_size": 2,
             "pad_token_id": 0, "position_embedding_type": "absolute", "hidden_act": "gelu", "is_decoder": False,
             "add_cross_attention": False, "max_position_embeddings": 512}


class _Linear(nn.Linear):
    def reset_parameters(self) -> None:  # the file's tensors replace these (load_bert): not initialised, 0.3 s saved
        pass


class _Embedding(nn.Embedding):
    def reset_parameters(self) -> None:
        pass


class _LayerNorm(nn.LayerNorm):
    def reset_parameters(self) -> None:
        pass


class Embeddings(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.word_embeddings = _Embedding(config.vocab_size, config.hidden_size, padding_idx=config.pad_token_id)
        self.position_embeddings = _Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = _Embedding(config.type_vocab_size, config.hidden_size)
        self.LayerNorm = _LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, input_ids: torch.Tensor, token_type_ids: torch.Tensor | None = None,
                position_ids: torch.Tensor | None = None) -> torch.Tensor:
        if position_ids is None:
            position_ids = torch.arange(input_ids.shape[1], device=input_ids.device)[None]
        if token_type_ids is None:
            token_type_ids = torch.zeros_like(input_ids)
        embeddings = self.word_embeddings(input_ids) + self.token_type_embeddings(token_type_ids)
        embeddings = embeddings + self.position_embeddings(position_ids)
        return self.dropout(self.LayerNorm(embeddings))


class SelfAttention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.head_size = config.hidden_size // config.num_attention_heads
        self.scaling = self.head_size**-0.5
        self.query = _Linear(config.hidden_size, config.hidden_size)
        self.key = _Linear(config.hidden_size, config.hidden_size)
        self.value = _Linear(config.hidden_size, config.hidden_size)
        self.dropout = nn.Dropout(config.attention_probs_dropout_prob)

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None, weights: list | None = None) -> torch.Tensor:
        shape = (*hidden.shape[:-1], -1, self.head_size)
        query, key, value = (layer(hidden).view(*shape).transpose(1, 2) for layer in (self.query, self.key, self.value))
        dropout = self.dropout.p if self.training else 0.0
        if weights is None:
            out = nn.functional.scaled_dot_product_attention(query, key, value, attn_mask=mask, dropout_p=dropout,
                                                             scale=self.scaling)
        else:  # the probabilities wanted too (a teacher's attention): computed out, as transformers' eager path
            scores = torch.matmul(query, key.transpose(2, 3)) * self.scaling
            if mask is not None:
                scores = scores + (mask if mask.dtype != torch.bool else
                                   torch.where(mask, 0.0, torch.finfo(scores.dtype).min).to(scores.dtype))
            probabilities = nn.functional.dropout(scores.softmax(-1), p=dropout, training=self.training)
            weights.append(probabilities)
            out = torch.matmul(probabilities, value)
        return out.transpose(1, 2).contiguous().reshape(*hidden.shape[:-1], -1).contiguous()


class DenseNorm(nn.Module):
    """A projection, dropout, and the residual's LayerNorm (BERT's SelfOutput and Output)."""

    def __init__(self, inputs: int, config) -> None:
        super().__init__()
        self.dense = _Linear(inputs, config.hidden_size)
        self.LayerNorm = _LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.LayerNorm(self.dropout(self.dense(hidden)) + residual)


class Attention(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.self = SelfAttention(config)
        self.output = DenseNorm(config.hidden_size, config)


class Intermediate(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = _Linear(config.hidden_size, config.intermediate_size)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return nn.functional.gelu(self.dense(hidden))


class Layer(nn.Module):
    """One encoder layer; called as transformers' BertLayer is: ``layer(hidden, attention_mask=bias)`` -> hidden."""

    def __init__(self, config) -> None:
        super().__init__()
        self.attention = Attention(config)
        self.intermediate = Intermediate(config)
        self.output = DenseNorm(config.intermediate_size, config)

    def forward(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None = None, weights: list | None = None) -> torch.Tensor:
        attended = self.attention.output(self.attention.self(hidden, attention_mask, weights), hidden)
        return self.output(self.intermediate(attended), attended)


class Encoder(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.layer = nn.ModuleList([Layer(config) for _ in range(config.num_hidden_layers)])


class Pooler(nn.Module):
    def __init__(self, config) -> None:
        super().__init__()
        self.dense = _Linear(config.hidden_size, config.hidden_size)


@dataclass
class Output:
    """What callers read of transformers' model output."""

    last_hidden_state: torch.Tensor
    attentions: tuple | None = None


class BertModel(nn.Module):
    """Embeddings and encoder layers (and the pooler's weights where the checkpoint has them, unused)."""

    def __init__(self, config, pooler: bool = False) -> None:
        super().__init__()
        self.config = config
        self.embeddings = Embeddings(config)
        self.encoder = Encoder(config)
        if pooler:
            self.pooler = Pooler(config)

    @property
    def base_model(self) -> "BertModel":
        return self

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                output_attentions: bool = False) -> Output:
        hidden = self.embeddings(input_ids=input_ids, token_type_ids=token_type_ids, position_ids=position_ids)
        # transformers' SDPA mask: none when nothing is padded, else True where a key may be attended
        mask = None
        if attention_mask is not None and not attention_mask.bool().all():
            mask = attention_mask.bool()[:, None, None, :].expand(-1, 1, input_ids.shape[1], -1)
        weights: list | None = [] if output_attentions else None
        for layer in self.encoder.layer:
            hidden = layer(hidden, mask, weights)
        return Output(hidden, tuple(weights) if weights is not None else None)


class BertForQuestionAnswering(nn.Module):
    """``bert`` and the span head ``qa_outputs``, as transformers names them."""

    def __init__(self, config) -> None:
        super().__init__()
        self.config = config
        self.bert = BertModel(config)
        self.qa_outputs = _Linear(config.hidden_size, 2)

    @property
    def base_model(self) -> BertModel:
        return self.bert


def read_config(path: Path) -> SimpleNamespace | None:
    """The checkpoint's config with transformers' defaults, named by ``path`` as transformers names it; None where
    this module does not compute what transformers would."""
    try:
        raw = json.loads((path / CONFIG).read_text())
    except (OSError, ValueError):
        return None
    config = SimpleNamespace(**(_DEFAULTS | raw))
    config._name_or_path = str(path)
    exact = (raw.get("model_type") == "bert" and config.position_embedding_type == "absolute" and config.hidden_act == "gelu"
             and not config.is_decoder and not config.add_cross_attention and not getattr(config, "chunk_size_feed_forward", 0)
             and config.hidden_size % config.num_attention_heads == 0)
    return config if exact else None


def load_bert(path: str | Path, head: str, dtype: torch.dtype | None = None) -> nn.Module | None:
    """A checkpoint as ``BertForQuestionAnswering`` (``head`` "qa") or ``BertModel`` ("none"), its weights read from
    ``model.safetensors`` (in ``dtype``, else as stored); None unless every module weight is in the file and the file
    holds no other (transformers would then initialise or drop some: let it)."""
    path = Path(path)
    config = read_config(path) if path.is_dir() else None
    if config is None or not (path / WEIGHTS).exists():
        return None
    from safetensors.torch import load_file

    weights = load_file(str(path / WEIGHTS))
    for name in [k for k in weights if k.endswith("embeddings.position_ids")]:  # a buffer older checkpoints saved,
        del weights[name]  # which transformers drops (positions are computed)
    if head == "qa":
        weights = {k if k.startswith(("bert.", "qa_outputs.")) else f"bert.{k}": v for k, v in weights.items()}
        model = BertForQuestionAnswering(config)
    else:  # as transformers' BertModel loads a checkpoint: a head's weights dropped; a missing pooler (never read
        # here: vectors are pooled by Encoder) left out, where transformers would draw one at random
        weights = {k.removeprefix("bert."): v for k, v in weights.items() if not k.startswith(("qa_outputs.", "cls."))}
        model = BertModel(config, pooler=any(k.startswith("pooler.") for k in weights))
    names = set(model.state_dict())
    if set(weights) != names:
        return None
    if dtype is not None:
        weights = {k: v.to(dtype) for k, v in weights.items()}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.eval()


TOKENIZER = "tokenizer.json"
TOKENIZER_CONFIG = "tokenizer_config.json"
_SPECIALS = ("unk_token", "sep_token", "pad_token", "cls_token", "mask_token")  # transformers' order of all_special_ids


class LightTokenizer:
    """The calls the query path makes of a transformers fast tokenizer, on the ``tokenizers`` object it wraps.

    Truncation is applied to each encoding (``Encoding.truncate``, then the post-processor's special tokens),
    never set on the shared tokenizer, so concurrent calls with other limits do not meet.
    """

    def __init__(self, backend, specials: dict[str, str]) -> None:
        self.backend = backend
        backend.no_truncation()
        backend.no_padding()
        for name, token in specials.items():
            setattr(self, name, token)
            setattr(self, f"{name}_id", backend.token_to_id(token))

    @classmethod
    def load(cls, path: str | Path) -> "LightTokenizer | None":
        """The checkpoint's tokenizer, or None where transformers' would tokenize otherwise (another class, a config
        that changes the normalizer, clean-up of decoded spaces, added tokens beyond the special ones)."""
        path = Path(path)
        try:
            config = json.loads((path / TOKENIZER_CONFIG).read_text())
            described = json.loads((path / TOKENIZER).read_text())
        except (OSError, ValueError):
            return None
        normalizer = described.get("normalizer") or {}
        specials = {name: config.get(name) for name in _SPECIALS}
        exact = (
            config.get("tokenizer_class") in ("BertTokenizer", "BertTokenizerFast")
            and not config.get("clean_up_tokenization_spaces", False)
            and splits_words_alone(described)
            and normalizer.get("type") == "BertNormalizer"
            and normalizer.get("lowercase") == config.get("do_lower_case", True)
            and normalizer.get("strip_accents") == config.get("strip_accents")
            and normalizer.get("handle_chinese_chars") == config.get("tokenize_chinese_chars", True)
            and all(isinstance(token, str) for token in specials.values())
            and {t["content"] for t in described.get("added_tokens", [])} <= set(specials.values())
        )
        if not exact:
            return None
        from tokenizers import Tokenizer

        tokenizer = cls(Tokenizer.from_file(str(path / TOKENIZER)), specials)
        return tokenizer if None not in (tokenizer.cls_token_id, tokenizer.sep_token_id, tokenizer.pad_token_id) else None

    @property
    def backend_tokenizer(self):
        """The ``tokenizers`` object, under the name transformers gives it."""
        return self.backend

    def __len__(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    @property
    def all_special_ids(self) -> list[int]:
        return [getattr(self, f"{name}_id") for name in _SPECIALS]

    def get_vocab(self) -> dict[str, int]:
        return self.backend.get_vocab(with_added_tokens=True)

    def convert_ids_to_tokens(self, ids):
        return self.backend.id_to_token(ids) if isinstance(ids, int) else [self.backend.id_to_token(int(i)) for i in ids]

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __call__(self, text: str | list[str], add_special_tokens: bool = True, truncation: bool = False,
                 max_length: int | None = None, padding: bool = False, return_offsets_mapping: bool = False,
                 return_tensors: str | None = None) -> dict:
        single = isinstance(text, str)
        encodings = self.backend.encode_batch([text] if single else list(text), add_special_tokens=False)
        if truncation and max_length is not None:
            room = max_length - (self.backend.num_special_tokens_to_add(False) if add_special_tokens else 0)
            for encoding in encodings:
                encoding.truncate(max(room, 0))
        if add_special_tokens:
            encodings = [self.backend.post_process(encoding, add_special_tokens=True) for encoding in encodings]
        out = {"input_ids": [e.ids for e in encodings], "token_type_ids": [e.type_ids for e in encodings],
               "attention_mask": [e.attention_mask for e in encodings]}
        if return_offsets_mapping:
            out["offset_mapping"] = [e.offsets for e in encodings]
        if padding:
            width = max(len(ids) for ids in out["input_ids"])
            for key, fill in (("input_ids", self.pad_token_id), ("token_type_ids", 0), ("attention_mask", 0)):
                out[key] = [row + [fill] * (width - len(row)) for row in out[key]]
        if return_tensors == "pt":
            return {key: torch.tensor(value, dtype=torch.long) for key, value in out.items() if key != "offset_mapping"}
        return {key: value[0] for key, value in out.items()} if single else out


def load_light(path: str | Path, head: str, dtype: torch.dtype | None = None) -> tuple[nn.Module, LightTokenizer] | None:
    """``load_bert``'s model and ``LightTokenizer.load``'s tokenizer of a checkpoint, or None unless both apply."""
    model = load_bert(path, head, dtype)
    tokenizer = LightTokenizer.load(path) if model is not None else None
    return (model, tokenizer) if tokenizer is not None else None
