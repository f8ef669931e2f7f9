"""With no --model, the server serves the embedded default model (SmolLM2-135M-Instruct GGUF, installed)."""

from __future__ import annotations

import os

import pytest
from server_util import serve

from minisgl.models.default_model import default_model_path

pytestmark = pytest.mark.slow  # starts a server on the default model


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    args = ["--device", "cpu", "--dtype", "float32", "--max-total-tokens", "4096"]
    yield from serve(tmp_path_factory, "server-default", args)


def test_default_model_is_listed_and_chats(server):
    client = server.client()
    expected = os.path.splitext(os.path.basename(default_model_path()))[0]
    models = client.models.list().data
    assert [m.id for m in models] == [expected]
    r = client.chat.completions.create(
        model=expected, messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=8, temperature=0
    )
    answer = r.choices[0].message.content
    assert answer.strip() and "\ufffd" not in answer
    assert 1 <= r.usage.completion_tokens <= 8 and r.choices[0].finish_reason in ("stop", "length")
