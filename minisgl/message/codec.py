"""msgpack serialisation of registered dataclasses.

Every message that crosses a ZeroMQ socket is a dataclass registered here. A dataclass instance is written
as a two-element map `{"__m": name, "f": [field values in declaration order]}`; nested registered
dataclasses (a SamplingParams inside a request, TokenOutputs inside a batch) are written the same way,
recursively. Decoding rebuilds the instances by name, so both ends need only import the same classes.

Invariant: `unpack(pack(x)) == x` for every registered dataclass whose fields are msgpack-native types or
registered dataclasses (tuples come back as lists).
"""

from __future__ import annotations

import dataclasses
from typing import Any, TypeVar

import msgpack

T = TypeVar("T")

_REGISTRY: dict[str, type] = {}
_FIELDS: dict[type, tuple[str, ...]] = {}
_TAG = "__m"


def register(cls: type[T]) -> type[T]:
    """Make a dataclass serialisable by name. Usable as a decorator."""
    if not dataclasses.is_dataclass(cls):
        raise TypeError(f"{cls.__name__} is not a dataclass")
    name = cls.__name__
    if _REGISTRY.get(name, cls) is not cls:
        raise ValueError(f"two message classes are named {name}")
    _REGISTRY[name] = cls
    _FIELDS[cls] = tuple(f.name for f in dataclasses.fields(cls))
    return cls


def _default(obj: Any) -> Any:
    fields = _FIELDS.get(type(obj))
    if fields is None and isinstance(obj, int):  # msgpack hands over ints it cannot encode
        raise OverflowError(f"integer {obj} does not fit in 64 bits")
    if fields is None:
        raise TypeError(f"cannot serialise {type(obj).__name__}: not a registered message")
    return {_TAG: type(obj).__name__, "f": [getattr(obj, f) for f in fields]}


def _object_hook(d: dict) -> Any:
    name = d.get(_TAG)
    if name is None:
        return d
    cls = _REGISTRY[name]
    # Positional construction runs __post_init__ again, so such hooks must be idempotent (SamplingParams'
    # only normalises its lists).
    return cls(*d["f"])


def pack(msg: Any) -> bytes:
    return msgpack.packb(msg, default=_default, use_bin_type=True)


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, object_hook=_object_hook, raw=False, strict_map_key=False)
