"""One passage's record: fixed header, compressed sections, title and text, CRC-32 over it all."""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np
import torch
import zstandard as zstd

from .bits import BinaryTokens
from .codec import Codec
from .shard import DamagedIndex

VERSION = 1  # the record layout (the index format version lives in the manifest)
# version, pid length, tokens, then byte lengths of: ids, scale, bits, title, text (zstd)
_HEADER = struct.Struct("<BHIIIIII")
_CRC = struct.Struct("<I")


class CorruptRecord(DamagedIndex, ValueError):
    """A record failed its checksum or does not parse: the message names shard and row."""


@dataclass(frozen=True)
class Passage:
    """A retrieved passage as text."""

    title: str
    text: str
    id: str = ""


@dataclass(frozen=True)
class StoredPassage:
    """A passage as the index returns it: its row, id, text, and binary tokens."""

    row: int
    pid: str
    title: str
    text: str
    tokens: BinaryTokens

    @property
    def passage(self) -> Passage:
        return Passage(self.title, self.text, self.pid)


@dataclass(frozen=True)
class RecordFormat:
    """What every record of an index shares (from the manifest) and the codec that reads it."""

    codec: Codec
    split_layer: int
    calibration: str


def encode_record(fmt: RecordFormat, pid: str, title: str, text: str, tokens: BinaryTokens) -> bytes:
    """Serialize one passage."""
    return encode_arrays(fmt, pid, title, text, tokens.token_ids.numpy(), tokens.bits.numpy(), tokens.scale.numpy())


def encode_arrays(
    fmt: RecordFormat, pid: str, title: str, text: str, ids: np.ndarray, bits: np.ndarray, scale: np.ndarray
) -> bytes:
    """Serialize one passage from its arrays: token ids [L], packed bits uint8 [L, d/8], fp16 scales [L]."""
    ids = ids.astype(np.int32, copy=False)
    ids_z, scale_z, bits_z = fmt.codec.encode(ids, bits, scale)
    pid_b, title_b, text_z = pid.encode(), title.encode(), fmt.codec.encode_text(text)
    body = b"".join(
        [
            _HEADER.pack(VERSION, len(pid_b), len(ids), len(ids_z), len(scale_z), len(bits_z), len(title_b), len(text_z)),
            pid_b, ids_z, scale_z, bits_z, title_b, text_z,
        ]
    )
    return body + _CRC.pack(zlib.crc32(body))


def check_record(data: bytes, where: str) -> None:
    """Raise CorruptRecord unless the record's CRC-32 matches its bytes."""
    if len(data) < _HEADER.size + _CRC.size or zlib.crc32(memoryview(data)[: -_CRC.size]) != _CRC.unpack_from(data, len(data) - _CRC.size)[0]:
        raise CorruptRecord(f"{where}: checksum mismatch (the record was altered after it was written)")


def section_sizes(data: bytes) -> dict[str, int]:
    """Bytes per section of a stored record (header and checksum included in ``total``)."""
    _, pid_len, _, *lengths = _HEADER.unpack_from(data)
    names = ("ids", "scale", "bits", "title", "text")
    return {"pid": pid_len, **dict(zip(names, lengths)), "total": len(data)}


def record_tokens(data: bytes) -> int:
    """The token count in a record's header (a compaction copies records without decoding them)."""
    return _HEADER.unpack_from(data)[2]


def record_pid(data: bytes) -> str:
    """The passage id of a record (for error messages), without decoding the rest."""
    try:
        _, pid_len, *_ = _HEADER.unpack_from(data)
        return bytes(data[_HEADER.size : _HEADER.size + pid_len]).decode(errors="replace")
    except struct.error:
        return "?"


def _sections(data: bytes, where: str) -> tuple[int, list[memoryview]]:
    """Token count and the (pid, ids, scale, bits, title, text) sections of a checked record."""
    check_record(data, where)
    try:
        version, pid_len, n_tokens, *lengths = _HEADER.unpack_from(data)
    except struct.error as error:
        raise CorruptRecord(f"{where}: record header does not parse ({error})") from error
    if version != VERSION:
        raise CorruptRecord(f"{where}: record format {version}; this code reads format {VERSION}")
    view, offset, parts = memoryview(data), _HEADER.size, []
    for size in (pid_len, *lengths):
        parts.append(view[offset : offset + size])
        offset += size
    return n_tokens, parts


def record_token_ids(fmt: RecordFormat, data: bytes, where: str) -> np.ndarray:
    """The token ids of a checked record, without decoding its bits."""
    n_tokens, parts = _sections(data, where)
    ids = fmt.codec.decode_ids(parts[1])
    if len(ids) != n_tokens:
        raise CorruptRecord(f"{where}: {len(ids)} token ids, header says {n_tokens}")
    return ids


def decode_texts(fmt: RecordFormat, data: bytes, where: str) -> Passage:
    """The id, title and text of a checked record, without decoding its token ids or bits (an update's matching)."""
    _, parts = _sections(data, where)
    try:
        return Passage(str(parts[4], "utf-8"), fmt.codec.decode_text(parts[5]), str(parts[0], "utf-8"))
    except (UnicodeDecodeError, zstd.ZstdError) as error:
        raise CorruptRecord(f"{where}: text does not decode ({error})") from error


def decode_records(fmt: RecordFormat, values: list[bytes], rows: list[int], wheres: list[str]) -> list[StoredPassage]:
    """Check and parse records (one batch decode for all); CorruptRecord names the first bad one."""
    parsed = [_sections(value, where) for value, where in zip(values, wheres)]
    try:
        decoded = fmt.codec.decode_many([(p[1], p[2], p[3]) for _, p in parsed])
    except (zstd.ZstdError, ValueError):
        # Checksums passed, so this is a codec mismatch or a bug: find and name the record.
        for (_, parts), where in zip(parsed, wheres):
            try:
                fmt.codec.decode(parts[1], parts[2], parts[3])
            except (zstd.ZstdError, ValueError) as inner:
                raise CorruptRecord(f"{where}: record does not decode ({inner})") from inner
        raise
    out = []
    for row, where, (n_tokens, parts), (ids, bits, scale) in zip(rows, wheres, parsed, decoded):
        if len(ids) != n_tokens:
            raise CorruptRecord(f"{where}: {len(ids)} token ids, header says {n_tokens}")
        try:
            pid, title, text = str(parts[0], "utf-8"), str(parts[4], "utf-8"), fmt.codec.decode_text(parts[5])
        except (UnicodeDecodeError, zstd.ZstdError) as error:
            raise CorruptRecord(f"{where}: text does not decode ({error})") from error
        tokens = BinaryTokens(
            token_ids=torch.from_numpy(ids),
            bits=torch.from_numpy(bits),
            scale=torch.from_numpy(scale),
            split_layer=fmt.split_layer,
            hidden_size=fmt.codec.hidden_size,
            calibration=fmt.calibration,
        )
        out.append(StoredPassage(row, pid, title, text, tokens))
    return out
