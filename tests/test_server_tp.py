"""A real server with --tp 2 (gloo on CPU): the same greedy tokens as transformers (hence as --tp 1), and the
whole server going down when one tensor-parallel rank dies."""

from __future__ import annotations

import pytest
from server_util import TINY_ARGS, chat_ids, hf_greedy, serve, start_server, tiny_checkpoint, wait_gone

pytestmark = pytest.mark.slow  # starts tensor-parallel servers

MESSAGES = [{"role": "user", "content": "Name a capital city."}]
N_TOKENS = 10


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def server(ckpt, tmp_path_factory):
    yield from serve(tmp_path_factory, "server-tp", ["--model", ckpt, *TINY_ARGS, "--tp", "2", "--page-size", "4"])


def test_tp2_greedy_equals_single_rank(server, ckpt):
    from engine_util import hf_model
    from transformers import AutoTokenizer

    tok, hf = AutoTokenizer.from_pretrained(ckpt), hf_model(ckpt)
    client = server.client()
    model = client.models.list().data[0].id
    kw = dict(model=model, temperature=0, max_tokens=N_TOKENS, extra_body={"ignore_eos": True})
    ids = chat_ids(tok, MESSAGES)
    chat = client.chat.completions.create(messages=MESSAGES, **kw)
    assert chat.choices[0].message.content == tok.decode(hf_greedy(hf, ids, N_TOKENS)[0], skip_special_tokens=True)
    prompts = ["The quick brown fox", "Paris is"]
    r = client.completions.create(prompt=prompts, **kw)
    refs = [tok.decode(hf_greedy(hf, tok.encode(p), N_TOKENS)[0], skip_special_tokens=True) for p in prompts]
    assert [c.text for c in r.choices] == refs


def test_dead_rank_takes_the_server_down(server):
    procs = server.descendants()
    scheduler = server.child("minisgl-sched")
    # Ranks 1..N-1 are the scheduler's spawned children (its other child is multiprocessing's resource tracker).
    ranks = [p for p in scheduler.children() if "spawn_main" in " ".join(p.cmdline())]
    assert len(ranks) == 1
    ranks[0].kill()
    rc = server.proc.wait(timeout=30)
    assert rc != 0
    assert wait_gone(procs, 10) == []
    assert "scheduler process died" in server.log()


def test_two_nodes_through_the_cli(ckpt, tmp_path):
    """`--nnodes 2`: node 1 is `python -m minisgl --node-rank 1` (no HTTP, only its rank), node 0 the server;
    greedy output equals transformers, and node 1 exits cleanly when node 0 shuts down."""
    import subprocess
    import sys

    from engine_util import hf_model
    from server_util import REPO, free_port, minisgl_env
    from transformers import AutoTokenizer

    addr = f"127.0.0.1:{free_port()}"
    multi = ["--tp", "2", "--nnodes", "2", "--dist-init-addr", addr]
    with open(tmp_path / "node1.log", "w") as log:
        node1 = subprocess.Popen(
            [sys.executable, "-m", "minisgl", "--model", ckpt, *TINY_ARGS, *multi, "--node-rank", "1"],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=minisgl_env(),
            cwd=REPO,
            start_new_session=True,
        )
    try:
        server = start_server(["--model", ckpt, *TINY_ARGS, *multi, "--node-rank", "0"], str(tmp_path / "node0.log"))
        try:
            tok, hf = AutoTokenizer.from_pretrained(ckpt), hf_model(ckpt)
            client = server.client()
            prompt = "The quick brown fox"
            r = client.completions.create(
                model=client.models.list().data[0].id,
                prompt=prompt,
                temperature=0,
                max_tokens=N_TOKENS,
                extra_body={"ignore_eos": True},
            )
            ref = tok.decode(hf_greedy(hf, tok.encode(prompt), N_TOKENS)[0], skip_special_tokens=True)
            assert r.choices[0].text == ref
        finally:
            server.proc.terminate()
            server.proc.wait(timeout=30)
        assert node1.wait(timeout=30) == 0, (tmp_path / "node1.log").read_text()[-3000:]
    finally:
        if node1.poll() is None:
            node1.kill()
