"""A bounded, iterative parser of Yjs update (format v1) and state vector bytes, run before yrs sees them.

Why: yrs decodes lib0 ``Any`` values recursively (``Any::decode`` calls itself for every nested array or
map), so an ~80 kB update holding ~40,000 nested arrays overflows the native stack and the process dies
with SIGSEGV: no Python ``except`` can catch that. yrs also preallocates for counts it reads
(``Vec::with_capacity``, ``HashMap::with_capacity``), keeps clocks in ``u32`` with wrapping arithmetic,
and its legacy ``ContentJSON`` decoder reads one string more than the count it is given. This module
walks the whole update with an explicit stack, in pure Python, and raises :class:`UpdateError` (with
the reason) for anything malformed, truncated, followed by trailing bytes, or outside these bounds:

- ``Any`` values nested more than ``max_depth`` containers deep (default 64; honest metadata records
  nest 4: ``{"r": {"models": [[...]]}}``); JSON text in ``Embed``/``Format`` content likewise;
- every count at most what the remaining bytes could hold (each element needs at least one byte), every
  varint at most 10 bytes and 64 bits, clocks and struct ends within ``u32``, strings valid UTF-8;
- content yrs decodes divergently or that this layout never uses: ``ContentJSON`` (legacy), ``Move``
  (yrs-only), subdocuments, weak-link and unknown type refs;
- a nested shared type (``ContentType``) only as a direct child of a named root type, written without
  origins, so that no chain of nested types (which yrs deletes and garbage-collects recursively) can be
  built, not even across updates. Honest writers never create nested types at all.

:func:`parse_update` also returns what the update would insert (:class:`Update`): every item with its
origins, its parent and key when the bytes name them, and its ``Any`` values decoded as pycrdt returns
them from the wire (every number a float, buffers as bytes), so that ``overlay.metadata`` can judge an
update before yrs applies any of it.

Format (lib0 v1, as yrs ``Update::decode``/``ItemContent::decode``/``IdSet::decode`` read it)::

    update  = uint(#clients) { uint(#structs) uint(client) uint(clock) struct* }  delete_set
    struct  = info:u8 ; 0 = GC uint(len) | 10 = Skip uint(len) | item
    item    = [origin id if info&0x80] [right origin id if info&0x40]
              [if neither: uint(1) string(root name) | uint(0) id ; string(parent sub) if info&0x20]
              content(info & 0x0f)
    id      = uint(client) uint(clock)
    delete_set = uint(#clients) { uint(client) uint(#ranges) { uint(clock) uint(len) } }
    state_vector = uint(#clients) { uint(client) uint(clock) }

Cost: about 30 ms per MB when only checking, some five times what yrs takes to apply the update, and
about twice that when decoding the values too (docs/measurements.md, "Overlay internals").
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass, field
from typing import Any

MAX_DEPTH = 64  # containers; our own records nest 4
_U32 = 2**32
_U64 = 2**64

# lib0 Any tags
_UNDEFINED, _NULL, _INT, _F32, _F64, _BIGINT, _FALSE, _TRUE = 127, 126, 125, 124, 123, 122, 121, 120
_STRING, _OBJECT, _ARRAY, _BUFFER = 119, 118, 117, 116
_CONSTANTS: dict[int, Any] = {_UNDEFINED: None, _NULL: None, _FALSE: False, _TRUE: True}
_NUMBERS = {_F32: struct.Struct(">f"), _F64: struct.Struct(">d"), _BIGINT: struct.Struct(">q")}

# struct and content refs (yrs block.rs)
GC, DELETED, _JSON, _BINARY, _STR, _EMBED, _FORMAT, TYPE, ANY, _DOC, SKIP, _MOVE = range(12)
_HAS_ORIGIN, _HAS_RIGHT_ORIGIN, _HAS_PARENT_SUB = 0x80, 0x40, 0x20
_XML_ELEMENT, _XML_HOOK, _XML_TEXT = 3, 5, 6  # type refs 0..6: Array, Map, Text, XmlElement, ..., XmlText

_JSON_STRINGS = re.compile(r'"(?:[^"\\]|\\.)*"', re.DOTALL)
_JSON_BRACKETS = re.compile(r"[\[\]{}]")

Id = tuple[int, int]  # (client, clock)


class UpdateError(ValueError):
    """Bytes that are not a well-formed, bounded Yjs v1 update or state vector; the message says why."""


@dataclass(frozen=True, slots=True)
class Item:
    """One item of an update. ``root``/``parent``/``key`` are what the bytes say: an item written with
    an origin inherits its parent and key from that origin, and the bytes name neither."""

    client: int
    clock: int
    length: int  # in clock units
    content: int  # content ref: ANY, DELETED, TYPE, ...
    origin: Id | None
    right: Id | None
    root: str | None  # the parent, when it is a named root type
    parent: Id | None  # the parent, when it is a nested type (named by its item's id)
    key: str | None  # the parent sub (a map key), when named
    values: tuple[Any, ...] = ()  # the decoded values of ANY content


@dataclass(slots=True)
class Update:
    """What :func:`parse_update` read: the structs per client, the items, and the delete set."""

    items: list[Item] = field(default_factory=list)
    ranges: dict[int, list[tuple[int, int, int]]] = field(default_factory=dict)  # client: (start, end, ref)
    deletes: list[tuple[int, int, int]] = field(default_factory=list)  # (client, clock, length)
    delete_set_at: int = 0  # byte offset where the delete set starts


class _Reader:
    """A cursor over ``data`` whose every read checks the bytes are there."""

    __slots__ = ("data", "end", "pos")

    def __init__(self, data: bytes) -> None:
        self.data, self.pos, self.end = data, 0, len(data)

    def left(self) -> int:
        return self.end - self.pos

    def byte(self) -> int:
        if self.pos >= self.end:
            raise UpdateError(f"truncated at byte {self.pos}")
        b = self.data[self.pos]
        self.pos += 1
        return b

    def take(self, n: int) -> bytes:
        if n > self.end - self.pos:
            raise UpdateError(f"truncated: {n} bytes wanted at byte {self.pos}, {self.end - self.pos} left")
        start = self.pos
        self.pos += n
        return self.data[start : self.pos]

    def uint(self, limit: int = _U64) -> int:
        """A lib0 varuint below ``limit`` (yrs reads u32 fields with wrapping, so we refuse larger)."""
        data, pos = self.data, self.pos
        if pos < self.end and data[pos] < 0x80:  # fast path: one byte
            self.pos = pos + 1
            return data[pos]
        value, shift = 0, 0
        while True:
            if pos >= self.end:
                raise UpdateError(f"truncated varint at byte {pos}")
            b = data[pos]
            pos += 1
            value |= (b & 0x7F) << shift
            if b < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise UpdateError(f"varint over 10 bytes at byte {self.pos}")
        if value >= limit:
            raise UpdateError(f"value {value} at byte {self.pos} is out of range (limit {limit})")
        self.pos = pos
        return value

    def sint(self) -> int:
        """A lib0 varint (sign in bit 6 of the first byte), refusing one over 64 bits."""
        b = self.byte()
        negative = b & 0x40
        value, shift = b & 0x3F, 6
        while b & 0x80:
            b = self.byte()
            value |= (b & 0x7F) << shift
            shift += 7
            if shift > 70:
                raise UpdateError(f"varint over 10 bytes at byte {self.pos}")
        if value >= 2**63:
            raise UpdateError(f"integer {value} at byte {self.pos} is out of range")
        return -value if negative else value

    def count(self, per: int, what: str) -> int:
        """A count of elements each taking at least ``per`` bytes: more than fit is refused before
        anything (here or in yrs) loops or allocates for it."""
        n = self.uint()
        if n * per > self.end - self.pos:
            raise UpdateError(f"{what} count {n} at byte {self.pos} exceeds the {self.left()} bytes left")
        return n

    def text(self) -> str:
        """A lib0 var string, which must be valid UTF-8 (yrs may read it unchecked)."""
        n = self.uint()
        raw = self.take(n)
        try:
            return raw.decode()
        except UnicodeDecodeError:
            raise UpdateError(f"invalid UTF-8 in a string ending at byte {self.pos}") from None

    def id(self) -> Id:
        return self.uint(), self.uint(_U32)


def _read_any(r: _Reader, count: int, max_depth: int) -> list[Any]:
    """``count`` lib0 Any values, decoded with an explicit stack (no recursion) as pycrdt returns them
    from the wire, refusing nesting deeper than ``max_depth`` containers: yrs's ``Any::decode`` recurses
    once per level. A map repeating a key keeps the last value."""
    data = r.data
    top: list[Any] = []
    # open containers: (values still to read, the container, its key for the next value or None)
    stack: list[list[Any]] = [[count, top]]
    while stack:
        frame = stack[-1]
        if not frame[0]:
            stack.pop()
            continue
        frame[0] -= 1
        container = frame[1]
        key = r.text() if isinstance(container, dict) else None
        pos = r.pos
        if pos >= r.end:
            raise UpdateError(f"truncated Any value at byte {pos}")
        tag = data[pos]
        r.pos = pos + 1
        value: Any
        if tag == _STRING:
            value = r.text()
        elif tag == _INT:
            value = float(r.sint())
        elif tag in _NUMBERS:
            value = float(_NUMBERS[tag].unpack(r.take(_NUMBERS[tag].size))[0])
        elif tag in _CONSTANTS:
            value = _CONSTANTS[tag]
        elif tag in (_ARRAY, _OBJECT):
            n = r.count(1 if tag == _ARRAY else 2, "Any container")
            if len(stack) > max_depth:
                raise UpdateError(f"Any values nested over {max_depth} deep at byte {pos}")
            value = [] if tag == _ARRAY else {}
            stack.append([n, value])
        elif tag == _BUFFER:
            value = r.take(r.uint())
        else:
            raise UpdateError(f"unknown Any tag {tag} at byte {pos}")
        if key is None:
            container.append(value)
        else:
            container[key] = value
    return top


def _check_json(text: str, max_depth: int, where: int) -> None:
    """Refuse JSON text (Embed and Format content) nested over ``max_depth``; yrs parses it with
    serde_json, whose own limit (128) fails cleanly, but one bound for every value is simpler to trust."""
    depth = 0
    for bracket in _JSON_BRACKETS.findall(_JSON_STRINGS.sub("", text)):
        depth += 1 if bracket in "[{" else -1
        if depth > max_depth:
            raise UpdateError(f"JSON nested over {max_depth} deep in content ending at byte {where}")


def _content(r: _Reader, ref: int, max_depth: int) -> tuple[int, tuple[Any, ...]]:
    """Read one item's content: its length in clock units (yrs ``ItemContent::len``) and, for Any
    content, its values."""
    if ref == ANY:
        n = r.count(1, "Any content")
        return n, tuple(_read_any(r, n, max_depth))
    if ref == DELETED:
        return r.uint(_U32), ()
    if ref == _STR:
        return len(r.text().encode("utf-16-le")) // 2, ()  # yrs and Yjs count UTF-16 code units
    if ref == _BINARY:
        r.take(r.uint())
        return 1, ()
    if ref == _EMBED:
        _check_json(r.text(), max_depth, r.pos)
        return 1, ()
    if ref == _FORMAT:
        r.text()
        _check_json(r.text(), max_depth, r.pos)
        return 1, ()
    if ref == TYPE:
        type_ref = r.byte()
        if type_ref > _XML_TEXT:
            raise UpdateError(f"unsupported type ref {type_ref} at byte {r.pos}")
        if type_ref in (_XML_ELEMENT, _XML_HOOK):
            r.text()
        return 1, ()
    if ref == _DOC:
        raise UpdateError(f"subdocument content at byte {r.pos} (not part of this document's layout)")
    if ref == _JSON:
        raise UpdateError(f"legacy JSON content at byte {r.pos} (yrs decodes it inconsistently)")
    raise UpdateError(f"unsupported content ref {ref} at byte {r.pos}")


def _item(r: _Reader, info: int, client: int, clock: int, start: int, max_depth: int) -> Item:
    ref = info & 0x1F
    if ref in (GC, SKIP) or ref > 0x0F:
        raise UpdateError(f"invalid struct info {info:#04x} at byte {start}")
    origin = r.id() if info & _HAS_ORIGIN else None
    right = r.id() if info & _HAS_RIGHT_ORIGIN else None
    root = parent = key = None
    if not info & (_HAS_ORIGIN | _HAS_RIGHT_ORIGIN):
        parent_info = r.uint()
        if parent_info == 1:
            root = r.text()
        elif parent_info == 0:
            parent = r.id()
        else:
            raise UpdateError(f"invalid parent info {parent_info} at byte {start}")
        if info & _HAS_PARENT_SUB:
            key = r.text()
    if ref == TYPE and root is None:
        raise UpdateError(f"nested shared type at byte {start} outside a root type")
    length, values = _content(r, ref, max_depth)
    return Item(client, clock, length, ref, origin, right, root, parent, key, values)


def parse_update(data: bytes, max_depth: int = MAX_DEPTH) -> Update:
    """``data`` as exactly one well-formed Yjs v1 update within the bounds in the module docstring, or
    :class:`UpdateError`. Runs in time linear in ``len(data)`` and memory linear in it too."""
    r, update = _Reader(data), Update()
    for _ in range(r.count(3, "client")):
        structs = r.count(1, "struct")
        client = r.uint()
        clock = r.uint(_U32)
        ranges = update.ranges.setdefault(client, [])
        for _ in range(structs):
            start = r.pos
            info = r.byte()
            if info in (GC, SKIP):
                length, ref = r.uint(_U32), info
            else:
                item = _item(r, info, client, clock, start, max_depth)
                update.items.append(item)
                length, ref = item.length, item.content
            ranges.append((clock, clock + length, ref))
            clock += length
            if clock >= _U32:
                raise UpdateError(f"clock overflows u32 at byte {start}")
    update.delete_set_at = r.pos
    for _ in range(r.count(2, "delete set client")):
        client = r.uint()
        for _ in range(r.count(2, "delete range")):
            clock, length = r.uint(_U32), r.uint(_U32)
            if clock + length >= _U32:
                raise UpdateError(f"delete range overflows u32 at byte {r.pos}")
            update.deletes.append((client, clock, length))
    if r.pos != r.end:
        raise UpdateError(f"{r.end - r.pos} trailing bytes after the delete set")
    return update


def check_update(data: bytes, max_depth: int = MAX_DEPTH) -> None:
    """Raise :class:`UpdateError` unless ``data`` is exactly one well-formed Yjs v1 update within the
    bounds in the module docstring."""
    parse_update(data, max_depth)


def parse_state_vector(data: bytes) -> dict[int, int]:
    """``data`` as exactly one state vector (a count, then that many (client, clock) pairs, clocks within
    u32 as yrs keeps them), or :class:`UpdateError`."""
    r, clocks = _Reader(data), {}
    for _ in range(r.count(2, "client")):
        client = r.uint()
        clocks[client] = r.uint(_U32)
    if r.pos != r.end:
        raise UpdateError(f"{r.end - r.pos} trailing bytes after the state vector")
    return clocks


def check_state_vector(data: bytes) -> None:
    """Raise :class:`UpdateError` unless ``data`` is exactly one state vector."""
    parse_state_vector(data)


def _varuint(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(0x80 | (value & 0x7F))
        value >>= 7
    out.append(value)
    return bytes(out)


def with_deletes(data: bytes, update: Update, deletes: list[tuple[int, int, int]]) -> bytes:
    """``data`` (parsed as ``update``) with its delete set replaced by ``deletes`` (client, clock,
    length): the structs are kept byte for byte."""
    by_client: dict[int, list[tuple[int, int]]] = {}
    for client, clock, length in deletes:
        by_client.setdefault(client, []).append((clock, length))
    out = [data[: update.delete_set_at], _varuint(len(by_client))]
    for client, ranges in by_client.items():
        out += [_varuint(client), _varuint(len(ranges))]
        out += [_varuint(clock) + _varuint(length) for clock, length in ranges]
    return b"".join(out)
