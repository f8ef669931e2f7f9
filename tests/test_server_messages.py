"""The wire format between serving processes: every message type crosses a real ZeroMQ socket unchanged."""

from __future__ import annotations

import shutil

import pytest
import zmq

from minisgl.message import (
    AbortReq,
    DetokenizeReq,
    GenerateReq,
    IpcPaths,
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
    inbox,
    outbox,
    pack,
    recv,
    send,
    unpack,
)
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.io import SchedulerStats, TokenOutput

PARAMS = SamplingParams(
    temperature=0.7,
    top_k=5,
    seed=2**62,
    max_tokens=9,
    stop=["\n\n", "東"],
    stop_token_ids=[3],
    n=2,
    logprobs=True,
    top_logprobs=2,
)
MESSAGES = [
    GenerateReq("r1", PARAMS, messages=[{"role": "user", "content": "héllo 😀"}], max_tokens=None, echo=True),
    GenerateReq("r2", SamplingParams(), input_ids=[1, 2, 3], skip_special_tokens=False),
    AbortReq("r1"),
    AbortReq("r1", 1),
    TokenizeReq("t", text="abc", add_special_tokens=False),
    DetokenizeReq("d", [5, 6]),
    TokenizedGenerateReq("r1", [1, 2, 3], PARAMS),
    ModelInfo("/m", 1024, 384, [0, 2]),
    TokenOutputBatch([TokenOutput("r1", 1, [7], True, "stop", [-0.5], [[[7, -0.5], [8, -1.25]]], 3, 1)]),
    StatsMsg(SchedulerStats(2, 1, 0.25, 0.5, 10, 20, {"retractions": 1})),
    ReqError("r1", "bad", 400, "max_tokens", "context_length_exceeded"),
    StrOutputBatch(
        [StrOutput("r1", 0, "東", True, "length", 1, 3, 4, 0, [TokenLogprob("東", 9, -0.1, [["東", -0.1]])], "prompt")]
    ),
    TokenizeResult("t", [1, 2], "ab", 1024),
]


@pytest.mark.parametrize("msg", MESSAGES, ids=[type(m).__name__ for m in MESSAGES])
def test_message_crosses_a_socket_unchanged(msg, tmp_path):
    paths = IpcPaths.create(str(tmp_path))
    ctx = zmq.Context()
    try:
        rx, tx = inbox(ctx, paths.scheduler), outbox(ctx, paths.scheduler)
        send(tx, msg)
        assert rx.poll(5000)
        got = recv(rx)
        assert type(got) is type(msg) and got == msg
        assert recv(rx, block=False) is None
    finally:
        ctx.destroy(linger=0)


def test_unregistered_values_are_refused():
    class NotAMessage:
        pass

    with pytest.raises(TypeError):
        pack(AbortReq(NotAMessage()))  # type: ignore[arg-type]
    with pytest.raises(OverflowError):
        pack(ReqError("r", "m", 2**64))
    assert unpack(pack({"plain": [1, "x"]})) == {"plain": [1, "x"]}


def test_ipc_paths_live_in_one_short_private_dir():
    paths = IpcPaths.create()
    try:
        assert all(p.startswith("ipc://" + paths.dir) for p in (paths.api, paths.tokenizer, paths.scheduler))
        assert max(len(p) for p in (paths.api, paths.tokenizer, paths.scheduler)) < 100  # the ipc path limit
    finally:
        shutil.rmtree(paths.dir)
