"""Quality and memory of quantized real-sized models: perplexity of the default model (SmolLM2-135M, Q4_1 GGUF)
on a fixed English text in each precision, and peak RSS of loading a 1.5B-parameter model in int4."""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from engine_util import engine_prefill_logits

from minisgl import LLM
from minisgl.models.default_model import default_model_path
from minisgl.quant import int4

pytestmark = pytest.mark.slow  # perplexity and memory on real-sized models

# Written for this test; any fixed, ordinary English prose would do.
TEXT = """\
The old harbour town wakes slowly in winter. Before the sun clears the hills, the bakers have already lit their
ovens, and the smell of warm bread drifts down the narrow streets toward the water. Fishing boats rock against the
pier while their crews check nets and argue quietly about the weather. Most of them have worked these waters for
decades, and they trust the colour of the sky more than any forecast on the radio.

By eight o'clock the market square is busy. Farmers from the valley arrive with crates of apples, potatoes and
cabbages, and a woman who keeps bees sells honey in small glass jars. Children on their way to school stop to look
at the fish laid out on ice, pointing at the strange ones with long teeth and silver scales. The teacher waiting at
the corner calls their names twice before they hurry on.

In the afternoon the town grows quiet again. The library, a stone building that was once a customs house, fills
with retired sailors reading newspapers and students preparing for their exams. The librarian has lived here all
her life. She knows which books are borrowed most often, which shelves need repair, and which visitors will ask
for help finding a map of the coast as it looked a hundred years ago.

When evening comes, lights appear one by one in the windows above the shops. Families sit down to dinner, the
harbour master makes his last round along the docks, and the lighthouse at the end of the breakwater begins to
turn. Visitors who come in summer rarely see the town like this, but the people who live here say that winter is
when it feels most like home.
"""


def perplexity(llm: LLM, ids: list[int]) -> float:
    logits, _ = engine_prefill_logits(llm, ids)
    nll = torch.nn.functional.cross_entropy(logits[:-1].float(), torch.tensor(ids[1:]))
    return math.exp(nll.item())


def test_default_model_perplexity_per_precision(monkeypatch):
    """bf16 with the GGUF dequantized is the reference; int8 must stay within 1% of it, the file's own 4 bits
    and int4 requantized within 5%; the file's 4 bits with activations rounded to int8 (--dtype auto, every
    row through the native kernel, as in decode) within 1% of the file's 4 bits in bf16."""
    path = default_model_path()
    ppl: dict[str, float] = {}
    ids: list[int] = []
    runs = [("bf16", "none", "bfloat16"), ("int8", "int8", "bfloat16"), ("gguf-4bit", None, "bfloat16"),
            ("int4", "int4", "bfloat16"), ("gguf-4bit-q8", None, "auto")]  # fmt: skip
    for name, quantization, dtype in runs:
        if name == "gguf-4bit-q8":  # a prompt-sized input would otherwise take the dense path
            monkeypatch.setattr(int4, "CPU_INT4_NATIVE_MAX_ROWS", 1 << 20)
        llm = LLM(path, device="cpu", dtype=dtype, quantization=quantization, disable_radix_cache=True)
        ids = ids or llm.tokenizer.encode(TEXT)
        ppl[name] = perplexity(llm, ids)
        del llm
    print(f"\nperplexity over {len(ids)} tokens: " + ", ".join(f"{k} {v:.3f}" for k, v in ppl.items()))
    assert len(ids) > 300 and 1.5 < ppl["bf16"] < 60  # a sane language model on plain English
    assert abs(ppl["int8"] / ppl["bf16"] - 1) <= 0.01
    assert abs(ppl["gguf-4bit"] / ppl["bf16"] - 1) <= 0.05
    assert abs(ppl["int4"] / ppl["bf16"] - 1) <= 0.05
    assert abs(ppl["gguf-4bit-q8"] / ppl["gguf-4bit"] - 1) <= 0.01


_PEAK_RSS = """
import resource, sys, torch
from minisgl.engine.config import EngineConfig
from minisgl.engine.engine import Engine
torch.set_num_threads(2)
engine = Engine(EngineConfig(model=sys.argv[1], device="cpu", load_format="dummy", quantization=sys.argv[2],
                             dtype="bfloat16", max_total_tokens=64, max_model_len=64))
params = sum(m.numel() for m in engine.model.state_dict().values())
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, params)
"""


@pytest.mark.timeout(300)
def test_int4_1p5b_model_loads_under_2gb_peak_rss():
    """A Qwen2.5-1.5B-shaped model (3 GB in bf16) built and filled with dummy weights in int4: the dense model
    never exists, so the process peaks well under 2 GB."""
    cfg = os.path.join(os.path.dirname(__file__), "..", "benchmark", "configs", "qwen2.5-1.5b")
    # Through a small intermediate Python: Linux carries the parent's peak RSS into an exec'd child's
    # ru_maxrss, so a child spawned straight from this (large) pytest process would report pytest's peak.
    relay = "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"
    out = subprocess.run(
        [sys.executable, "-c", relay, sys.executable, "-c", _PEAK_RSS, cfg, "int4"],
        capture_output=True, text=True, check=True, timeout=280,
        env={**os.environ, "PYTHONPATH": os.path.join(os.path.dirname(__file__), "..")},
    )  # fmt: skip
    peak, stored = map(int, out.stdout.split()[-2:])
    print(f"\nint4 1.5B dummy load: peak RSS {peak / 2**30:.2f} GiB, {stored / 1e6:.0f}M stored elements")
    assert peak < 2 * 2**30
    assert stored > 0.5e9  # the embedding alone is 233M; int4 linears store ~0.5 elements per weight
