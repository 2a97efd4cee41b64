"""The header of a GGUF file (llama.cpp's format): metadata and tensor table, without the data.

Both the tokenizer (API-server processes, no torch) and the weight loader read it. It parses the
header in about 50 ms, where `gguf.GGUFReader` takes 2-3 s building a numpy view per vocabulary
string.
"""
from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple, Union


class GGUFTensorInfo(NamedTuple):
    name: str
    shape: tuple[int, ...]  # numpy / torch order: (out, in) for a linear weight
    ggml_type: int
    offset: int  # absolute byte offset of the tensor data in the file


@dataclass
class GGUFHeader:
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]


_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY, _FLOAT32 = 8, 9, 6


def _shortest_float32(x: float) -> float:
    """The shortest decimal that is this float32: 1e-05 (as config.json says), not
    9.999999747378752e-06."""
    for digits in range(1, 10):
        candidate = float(f"{x:.{digits}g}")
        if struct.unpack("<f", struct.pack("<f", candidate))[0] == x:
            return candidate
    return x


class _Cursor:
    """Sequential little-endian reads over the file's bytes; struct.error past the end."""

    def __init__(self, buf: mmap.mmap, pos: int) -> None:
        self.buf, self.pos = buf, pos

    def scalar(self, fmt: str) -> Any:
        (value,) = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return value

    def string(self) -> str:
        n = self.scalar("<Q")
        self.pos += n
        if self.pos > len(self.buf):  # slicing would silently come up short
            raise struct.error("string runs past the end of the file")
        return self.buf[self.pos - n:self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: int) -> Any:
        if vtype == _STRING:
            return self.string()
        if vtype == _ARRAY:
            etype, n = self.scalar("<I"), self.scalar("<Q")
            if etype in _SCALARS:  # one unpack for the whole array (token types, scores)
                fmt = f"<{n}{_SCALARS[etype][1]}"
                values = list(struct.unpack_from(fmt, self.buf, self.pos))
                self.pos += struct.calcsize(fmt)
                return values
            return [self.value(etype) for _ in range(n)]
        if vtype == _FLOAT32:
            return _shortest_float32(self.scalar("<f"))
        if vtype not in _SCALARS:
            raise ValueError(f"unknown GGUF metadata value type {vtype}")
        return self.scalar(_SCALARS[vtype])


def read_gguf_header(path: Union[str, os.PathLike]) -> GGUFHeader:
    """Metadata and tensor table of a GGUF (v2/v3) file; tensor data is left on disk."""
    name = os.fspath(path)
    with open(path, "rb") as f:
        magic = f.read(4)
        if magic != b"GGUF":
            raise ValueError(f"{name!r} is not a GGUF file (it starts with {magic!r})")
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
            try:
                metadata, infos, end = _parse_header(buf, name)
            except struct.error:
                raise ValueError(f"{name!r} is a truncated GGUF file") from None
    align = metadata.get("general.alignment", 32)
    data_start = -(-end // align) * align
    tensors = [GGUFTensorInfo(n, shape, t, data_start + off) for n, shape, t, off in infos]
    return GGUFHeader(metadata, tensors)


def _parse_header(buf: mmap.mmap, name: str) -> tuple[dict[str, Any], list[tuple], int]:
    cur = _Cursor(buf, pos=4)  # after the magic
    version = cur.scalar("<I")
    if version not in (2, 3):  # v1 had 32-bit counts; no file in use still has it
        raise ValueError(f"{name!r}: unsupported GGUF version {version}")
    n_tensors, n_kv = cur.scalar("<Q"), cur.scalar("<Q")
    metadata = {}
    for _ in range(n_kv):
        key = cur.string()
        metadata[key] = cur.value(cur.scalar("<I"))
    infos = []
    for _ in range(n_tensors):
        tensor = cur.string()
        dims = [cur.scalar("<Q") for _ in range(cur.scalar("<I"))]
        # GGUF lists dimensions fastest-first; numpy and torch want them the other way round.
        infos.append((tensor, tuple(reversed(dims)), cur.scalar("<I"), cur.scalar("<Q")))
    return metadata, infos, cur.pos
