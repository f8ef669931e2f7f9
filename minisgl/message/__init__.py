"""Typed messages between the serving processes, serialised with msgpack and carried by ZeroMQ."""

from minisgl.message.channel import IpcPaths, inbox, outbox, recv, send
from minisgl.message.codec import pack, register, unpack
from minisgl.message.types import (
    AbortReq,
    DetokenizeReq,
    FlushCacheReq,
    FlushCacheResult,
    GenerateReq,
    ModelInfo,
    ReqError,
    StatsMsg,
    StrOutput,
    StrOutputBatch,
    TokenizedGenerateReq,
    TokenizeReq,
    TokenizeResult,
    TokenLogprob,
    TokenOutputBatch,
)

__all__ = [
    "AbortReq",
    "DetokenizeReq",
    "FlushCacheReq",
    "FlushCacheResult",
    "GenerateReq",
    "IpcPaths",
    "ModelInfo",
    "ReqError",
    "StatsMsg",
    "StrOutput",
    "StrOutputBatch",
    "TokenLogprob",
    "TokenOutputBatch",
    "TokenizeReq",
    "TokenizeResult",
    "TokenizedGenerateReq",
    "inbox",
    "outbox",
    "pack",
    "recv",
    "register",
    "send",
    "unpack",
]
