"""`python -m minisgl --shell` driven through a pseudo-terminal (and through a pipe): answers equal the
greedy answers transformers gives for the same conversation, /reset forgets it, /exit and EOF leave."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import termios
import time

import pytest
from server_util import REPO, chat_ids, hf_greedy, minisgl_env, tiny_checkpoint

pytestmark = pytest.mark.slow  # runs the shell in subprocesses

MAX_TOKENS = 12
EOS = 0  # the tiny checkpoint's eos_token_id
ANSI = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07]*\x07|[=>])")
STATS = re.compile(r"\[(\d+) prompt tokens, (\d+) generated")


def clean(text: str) -> str:
    """Line ends as written by the program (the terminal turns "\n" into "\r\n", the editor adds "\r")."""
    return text.replace("\r", "")


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> str:
    return tiny_checkpoint(tmp_path_factory)


@pytest.fixture(scope="module")
def reference(ckpt):
    """answer(messages) -> the shell's expected answer: greedy until EOS or MAX_TOKENS, decoded."""
    from engine_util import hf_model
    from transformers import AutoTokenizer

    tok, hf = AutoTokenizer.from_pretrained(ckpt), hf_model(ckpt)

    def answer(messages: list[dict]) -> tuple[str, int]:
        ids = chat_ids(tok, messages)
        tokens, _ = hf_greedy(hf, ids, MAX_TOKENS)
        if EOS in tokens:
            tokens = tokens[: tokens.index(EOS)]
        return tok.decode(tokens, skip_special_tokens=True), len(ids)

    return answer


def shell_cmd(ckpt: str) -> list[str]:
    return [
        sys.executable,
        "-m",
        "minisgl",
        "--shell",
        "--model",
        ckpt,
        "--device",
        "cpu",
        "--dtype",
        "float32",
        "--max-total-tokens",
        "8192",
        "--log-level",
        "warning",
    ]


class Terminal:
    """The master side of a pty: what the program printed (escape sequences removed), and typing into it."""

    def __init__(self, fd: int):
        self.fd = fd
        self.raw = b""
        self.pos = 0  # chars of `text` already consumed by expect()

    @property
    def text(self) -> str:
        return clean(ANSI.sub("", self.raw.decode("utf-8", errors="replace")))

    def send(self, s: str) -> None:
        os.write(self.fd, s.encode())

    def type_line(self, line: str) -> None:
        """Wait for the prompt, type `line` and Enter, and wait until the editor has accepted it (it redraws
        the line in full): what follows is the program's answer."""
        self.expect(">")  # the prompt is drawn as ">" and a cursor move, not a literal space
        self.send(line + "\r")
        self.expect("> " + line)

    def expect(self, pattern: str | re.Pattern, timeout: float = 60) -> re.Match:
        """Wait for `pattern` after what earlier calls matched; return the match (its span in `text`)."""
        rx = re.compile(re.escape(pattern)) if isinstance(pattern, str) else pattern
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self.text, self.pos)
            if m:
                self.pos = m.end()
                return m
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{pattern!r} not seen; the terminal shows:\n{self.text[-3000:]}")
            if select.select([self.fd], [], [], min(left, 0.5))[0]:
                try:
                    self.raw += os.read(self.fd, 65536)
                except OSError:  # the program exited and closed the pty
                    raise AssertionError(f"{pattern!r} not seen before exit:\n{self.text[-3000:]}") from None


def test_shell_in_a_pseudo_terminal(ckpt, reference):
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 250, 0, 0))
    env = minisgl_env(TERM="xterm", PROMPT_TOOLKIT_NO_CPR="1")
    proc = subprocess.Popen(
        shell_cmd(ckpt), stdin=slave, stdout=slave, stderr=slave, env=env, cwd=REPO, start_new_session=True
    )
    os.close(slave)
    term = Terminal(master)
    try:
        term.expect("minisgl shell")
        term.type_line(f"/set max_tokens {MAX_TOKENS}")
        term.expect(f"(max_tokens = {MAX_TOKENS})")
        term.type_line("/set temperature 0")  # greedy, to compare with transformers
        term.expect("(temperature = 0)")

        first = [{"role": "user", "content": "Name a capital city."}]
        answer1, prompt1 = reference(first)
        assert answer1.strip(), "the reference answer should be visible text"
        term.type_line(first[0]["content"])
        start = term.pos
        stats = term.expect(STATS)
        assert clean(answer1) in term.text[start : stats.start()]
        assert int(stats.group(1)) == prompt1

        second = first + [{"role": "assistant", "content": answer1}, {"role": "user", "content": "And another?"}]
        answer2, prompt2 = reference(second)
        assert answer2.strip() and answer2 != answer1
        term.type_line("And another?")
        start = term.pos
        stats = term.expect(STATS)
        assert clean(answer2) in term.text[start : stats.start()]
        assert int(stats.group(1)) == prompt2 > prompt1  # the first turn is part of the prompt

        term.type_line("/reset")
        term.expect("(conversation cleared)")
        term.type_line(first[0]["content"])
        start = term.pos
        stats = term.expect(STATS)
        assert int(stats.group(1)) == prompt1  # history gone: the same prompt as the first turn
        assert clean(answer1) in term.text[start : stats.start()]

        term.type_line("/exit")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, 9)
            proc.wait()
        os.close(master)


def test_shell_reads_a_pipe_until_eof(ckpt, reference):
    lines = f"/set max_tokens {MAX_TOKENS}\n/set temperature 0\nName a capital city.\n"
    p = subprocess.run(
        shell_cmd(ckpt), input=lines, capture_output=True, text=True, env=minisgl_env(), cwd=REPO, timeout=120
    )
    assert p.returncode == 0, p.stderr[-3000:]
    answer, prompt_tokens = reference([{"role": "user", "content": "Name a capital city."}])
    assert answer in p.stdout
    assert STATS.search(p.stdout).group(1) == str(prompt_tokens)


def test_sampled_turns_draw_fresh_seeds_unless_one_is_set(ckpt):
    """Without `/set seed` every turn samples with a new seed (as llama-cli); with one, every turn uses it."""
    from minisgl import LLM
    from minisgl.server.shell import ChatSession

    llm = LLM(ckpt, device="cpu", dtype="float32")
    seeds = []
    stream = llm.stream
    llm.stream = lambda ids, params: (seeds.append(params.seed), stream(ids, params))[1]
    chat = ChatSession(llm)
    chat.set_param("max_tokens", "2")
    assert chat.params.temperature > 0  # the shell samples by default
    for _ in range(3):
        chat.answer("hi", lambda text: None)
    chat.set_param("seed", "7")
    for _ in range(2):
        chat.answer("hi", lambda text: None)
    assert len(set(seeds[:3])) == 3 and None not in seeds[:3]
    assert seeds[3:] == [7, 7]
