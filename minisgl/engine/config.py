"""Engine configuration: every knob of `LLM(...)` and of the server's engine flags."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class EngineConfig:
    """What to load and how to run it. Defaults follow SGLang where it has the same knob."""

    model: str | None = None  # local dir, .gguf file or HF repo id; None = the embedded default model
    tokenizer: str | None = None
    dtype: str = "auto"  # auto | bfloat16 | float16 | float32
    kv_cache_dtype: str = "auto"  # auto | bfloat16 | float16 | float32 (see engine.resolve_kv_cache_dtype)
    device: str | None = None  # cuda when available, else cpu
    page_size: int | None = None  # tokens per KV page; None = 16 on the CPU, 1 on CUDA (Engine.page_size)
    max_total_tokens: int | None = None  # KV pool size in tokens; None = mem_fraction_static of free memory
    mem_fraction_static: float = 0.85
    chunked_prefill_size: int | None = None  # prompt tokens per prefill step; None = 512 on the CPU, 2048 on CUDA
    max_running_requests: int = 256
    max_model_len: int | None = None  # default: the model's context length
    disable_radix_cache: bool = False
    attention_backend: str | None = None  # torch | cpu | triton | flashinfer; None = best for the device
    load_format: str = "auto"  # auto | dummy
    quantization: str | None = None  # none | int8 | int4 | fp8; None = a GGUF keeps its own precision, else none
    quantize_lm_head: bool = False
    seed: int = 0
    tp_size: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None  # host:port of rank 0; default a free local port
    cuda_graph_max_bs: int = 256
    disable_overlap_schedule: bool = False
    trust_remote_code: bool = False
    cpu_threads: int | None = None  # CPU kernel threads; None = the cores this process may use
    # The server's: its HTTP and detokenizer processes work at every token, so a decode step of one request runs
    # on all cores or leaves them one, whichever the engine measures faster on this CPU (cpu_threads.ThreadProbe).
    # Only with cpu_threads None.
    cpu_spare_core: bool = False
    grammar_backend: str = "xgrammar"  # xgrammar | llguidance | none: constrained decoding (structured output)

    def resolved_device(self) -> torch.device:
        if self.device:
            return torch.device(self.device)
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
