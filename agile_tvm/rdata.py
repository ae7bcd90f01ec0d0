"""A minimal reader for R's lazy-load databases (`.rdx` index + `.rdb` objects).

The Austen corpus ships only as R data inside a Debian package. This reads the subset of R's XDR serialization that
character vectors, lists and their attributes use, so the corpus needs neither R nor an extra Python package.
"""

from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

_NILVALUE, _EMPTYENV, _GLOBALENV, _REF = 254, 242, 253, 255
_SYM, _LIST, _CHAR, _LGL, _INT, _REAL, _STR, _VEC = 1, 2, 9, 10, 13, 14, 16, 19


class RObject(list):
    """An R vector with attributes (names, class, ...)."""

    def __init__(self, values, attributes):
        super().__init__(values)
        self.attributes = attributes


class _Reader:
    def __init__(self, data: bytes):
        if data[:2] != b"X\n":
            raise ValueError("not an XDR-serialized R object")
        self.data, self.pos, self.refs = data, 2, []
        version = self._int()
        self._int(), self._int()  # writer and minimal reader versions
        if version == 3:
            length = self._int()  # native encoding name
            self.pos += length

    def _int(self) -> int:
        (value,) = struct.unpack_from(">i", self.data, self.pos)
        self.pos += 4
        return value

    def read(self):
        flags = self._int()
        kind, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if kind in (_NILVALUE, _EMPTYENV, _GLOBALENV):
            return None
        if kind == _REF:
            return self.refs[(flags >> 8) - 1]
        if kind == _SYM:
            name = self.read()
            self.refs.append(name)
            return name
        if kind == _CHAR:
            n = self._int()
            if n == -1:
                return None  # NA_character_
            text = self.data[self.pos: self.pos + n].decode("utf-8", "replace")
            self.pos += n
            return text
        if kind == _LIST:  # pairlist cell: [attr] [tag] car cdr
            if has_attr:
                self.read()
            tag = self.read() if has_tag else None
            head = [(tag, self.read())]
            tail = self.read()
            return head + (tail or [])
        n = self._int()
        if kind in (_STR, _VEC):
            values = [self.read() for _ in range(n)]
        elif kind in (_LGL, _INT):
            values = list(struct.unpack_from(f">{n}i", self.data, self.pos))
            self.pos += 4 * n
        elif kind == _REAL:
            values = list(struct.unpack_from(f">{n}d", self.data, self.pos))
            self.pos += 8 * n
        else:
            raise ValueError(f"R object type {kind} is not supported by this reader")
        if has_attr:
            return RObject(values, dict(self.read()))
        return values


def unserialize(data: bytes):
    return _Reader(data).read()


def read_lazyload_db(rdx: Path, rdb: Path) -> dict:
    """All variables of an R lazy-load database, by name."""
    index = unserialize(gzip.decompress(Path(rdx).read_bytes()))
    fields = dict(zip(index.attributes["names"], index))
    variables = fields["variables"]
    blob = Path(rdb).read_bytes()
    out = {}
    for name, (offset, length) in zip(variables.attributes["names"], variables):
        chunk = blob[offset: offset + length]
        out[name] = unserialize(zlib.decompress(chunk[4:]))  # 4-byte big-endian length, then zlib data
    return out
