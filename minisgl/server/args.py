"""Command-line flags of `python -m minisgl` (SGLang's names) and their mapping onto EngineConfig.

Importing this module must stay cheap (no torch): `--help` and the API server process use it.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass, fields


@dataclass
class ServerArgs:
    """Every flag, parsed. Engine flags are copied into EngineConfig by `engine_kwargs`."""

    model: str | None = None
    tokenizer: str | None = None
    host: str = "127.0.0.1"
    port: int = 30000
    dtype: str = "auto"
    kv_cache_dtype: str = "auto"
    device: str | None = None
    tp: int = 1
    nnodes: int = 1
    node_rank: int = 0
    dist_init_addr: str | None = None
    page_size: int | None = None
    max_total_tokens: int | None = None
    mem_fraction_static: float = 0.85
    chunked_prefill_size: int | None = None
    max_running_requests: int = 256
    context_length: int | None = None
    disable_radix_cache: bool = False
    attention_backend: str | None = None
    load_format: str = "auto"
    quantization: str | None = None
    quantize_lm_head: bool = False
    trust_remote_code: bool = False
    served_model_name: str | None = None
    api_key: str | None = None
    max_queued_requests: int | None = None
    request_timeout: float | None = None
    disable_web_ui: bool = False
    log_level: str = "info"
    shell: bool = False
    seed: int = 0
    dp: int = 1
    dp_rank: int = 0
    router_policy: str = "cache_aware"
    cpu_threads: int | None = None
    grammar_backend: str = "xgrammar"
    tool_call_parser: str = "hermes"

    def model_name(self, model_path: str) -> str:
        """The name clients must use in `model`: --served-model-name, else --model, else the file's name."""
        if self.served_model_name:
            return self.served_model_name
        if self.model:
            return self.model
        return os.path.splitext(os.path.basename(model_path.rstrip("/")))[0]

    def engine_kwargs(self) -> dict:
        """EngineConfig(**engine_kwargs()) for the scheduler. A plain dict, so the launcher need not import
        torch (EngineConfig's module does)."""
        kw = dict(
            model=self.model,
            tokenizer=self.tokenizer,
            dtype=self.dtype,
            kv_cache_dtype=self.kv_cache_dtype,
            device=self.device,
            tp_size=self.tp,
            nnodes=self.nnodes,
            node_rank=self.node_rank,
            dist_init_addr=self.dist_init_addr,
            page_size=self.page_size,
            max_total_tokens=self.max_total_tokens,
            mem_fraction_static=self.mem_fraction_static,
            chunked_prefill_size=self.chunked_prefill_size,
            max_running_requests=self.max_running_requests,
            max_model_len=self.context_length,
            disable_radix_cache=self.disable_radix_cache,
            attention_backend=self.attention_backend,
            load_format=self.load_format,
            quantization=self.quantization,
            quantize_lm_head=self.quantize_lm_head,
            seed=self.seed,
            cpu_threads=self.cpu_threads,
            trust_remote_code=self.trust_remote_code,
            grammar_backend=self.grammar_backend,
        )
        return kw


def _positive_int(s: str) -> int:
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {v}")
    return v


def _non_negative_int(s: str) -> int:
    v = int(s)
    if v < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {v}")
    return v


def _positive_float(s: str) -> float:
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {v}")
    return v


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows a flag's default unless its help already says it, or there is none (None, or an off switch)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if "default" in text or action.default is None or action.default is False:
            return text
        return super()._get_help_string(action) or text


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m minisgl",
        description="Serve a model over an OpenAI-compatible HTTP API, or chat with it in the terminal (--shell).",
        formatter_class=_HelpFormatter,
    )
    d = ServerArgs()
    m = p.add_argument_group("model")
    m.add_argument(
        "--model",
        "--model-path",
        dest="model",
        default=d.model,
        help="local checkpoint directory, .gguf file or Hugging Face repo id; omit for the embedded default model",
    )
    m.add_argument(
        "--tokenizer",
        "--tokenizer-path",
        dest="tokenizer",
        default=d.tokenizer,
        help="tokenizer directory or repo id, if not the model's own",
    )
    m.add_argument(
        "--dtype",
        default=d.dtype,
        choices=["auto", "bfloat16", "float16", "float32"],
        help="weight and activation dtype; auto picks the checkpoint's on GPU, a fast one on CPU",
    )
    m.add_argument(
        "--kv-cache-dtype",
        default=d.kv_cache_dtype,
        choices=["auto", "bfloat16", "bf16", "float16", "fp16", "float32"],
        help="KV cache dtype; auto: the activations', except fp16 under --dtype auto on a CPU with quantized "
        "weights (as llama.cpp's cache); another than the activations' only on the CPU",
    )
    m.add_argument(
        "--load-format",
        default=d.load_format,
        choices=["auto", "dummy"],
        help="dummy: random weights of the right shapes (benchmarks without a download)",
    )
    m.add_argument(
        "--quantization",
        default=d.quantization,
        choices=["none", "int8", "int4", "fp8"],
        help="weight-only int8 (per channel) / int4 (groups of 32), or fp8 (CUDA, compute 8.9+), applied "
        "at load; none dequantizes a GGUF (default: a GGUF keeps its own 4/8 bits, others load dense)",
    )
    m.add_argument(
        "--quantize-lm-head",
        action="store_true",
        help="quantize the LM head too (by default it stays dense unless a GGUF stores it quantized)",
    )
    m.add_argument("--trust-remote-code", action="store_true", help="allow custom tokenizer code from the repo")
    m.add_argument(
        "--served-model-name",
        default=d.served_model_name,
        help="the model name the API reports and accepts (default: --model)",
    )

    e = p.add_argument_group("engine")
    e.add_argument("--device", default=d.device, help="cuda or cpu (default: cuda when available)")
    e.add_argument(
        "--tp",
        "--tp-size",
        dest="tp",
        type=_positive_int,
        default=d.tp,
        help="tensor-parallel size: one scheduler process per rank, rank 0 receives requests",
    )
    e.add_argument(
        "--nnodes",
        type=_positive_int,
        default=d.nnodes,
        help="machines the tensor-parallel group spans; --tp is split evenly over them",
    )
    e.add_argument(
        "--node-rank",
        type=_non_negative_int,
        default=d.node_rank,
        help="this machine's index in 0..nnodes-1; node 0 serves HTTP, the others only run ranks",
    )
    e.add_argument(
        "--dist-init-addr",
        default=d.dist_init_addr,
        help="host:port where the ranks rendezvous (node 0's address; default a free local port)",
    )
    e.add_argument("--page-size", type=_positive_int, default=d.page_size,
                   help="tokens per KV-cache page (default: 16 on the CPU, 1 on CUDA)")  # fmt: skip
    e.add_argument(
        "--max-total-tokens",
        type=_positive_int,
        default=d.max_total_tokens,
        help="KV pool size in tokens (default: from --mem-fraction-static; on the CPU 4096, as llama.cpp's -c)",
    )
    e.add_argument(
        "--mem-fraction-static",
        type=_positive_float,
        default=d.mem_fraction_static,
        help="fraction of device memory for weights and KV pool",
    )
    e.add_argument(
        "--chunked-prefill-size",
        type=_positive_int,
        default=d.chunked_prefill_size,
        help="most prompt tokens prefilled in one step; longer prompts span several steps, between which "
        "running requests decode (default: 512 on the CPU, 2048 on CUDA)",
    )
    e.add_argument(
        "--max-running-requests",
        type=_positive_int,
        default=d.max_running_requests,
        help="most requests decoding at once",
    )
    e.add_argument(
        "--context-length",
        type=_positive_int,
        default=d.context_length,
        help="cap on prompt + output tokens (default: the model's)",
    )
    e.add_argument("--disable-radix-cache", action="store_true", help="do not reuse KV of shared prompt prefixes")
    e.add_argument(
        "--attention-backend",
        default=d.attention_backend,
        help="torch, cpu, triton or flashinfer (default: triton on CUDA, cpu on the CPU)",
    )
    e.add_argument("--seed", type=int, default=d.seed, help="seed for requests that do not set their own")
    e.add_argument(
        "--cpu-threads",
        type=int,
        default=d.cpu_threads,
        metavar="N",
        help="threads for CPU kernels (llama.cpp's -t); default: the cores this process may use (its affinity "
        "mask, within its CPU quota), less those other processes keep busy",
    )
    e.add_argument(
        "--grammar-backend",
        default=d.grammar_backend,
        choices=["xgrammar", "llguidance", "none"],
        help="library for structured output (JSON schema, regex, EBNF, tool calls); none refuses them",
    )
    e.add_argument(
        "--tool-call-parser",
        default=d.tool_call_parser,
        choices=["hermes", "llama3-json"],
        help="format of tool calls in the model's output (<tool_call>{...}</tool_call>, or bare JSON)",
    )

    s = p.add_argument_group("server")
    s.add_argument("--host", default=d.host, help="address to listen on")
    s.add_argument("--port", type=int, default=d.port, help="HTTP port")
    s.add_argument(
        "--api-key",
        default=d.api_key,
        help="require 'Authorization: Bearer KEY' on every endpoint but /health and the chat page",
    )
    s.add_argument(
        "--max-queued-requests",
        type=_positive_int,
        default=d.max_queued_requests,
        help="refuse new requests with HTTP 503 while this many wait for the scheduler",
    )
    s.add_argument(
        "--request-timeout",
        type=_positive_float,
        default=d.request_timeout,
        help="seconds a request may wait and run before it is ended with an error and aborted",
    )
    s.add_argument(
        "--disable-web-ui", action="store_true", help="do not serve the chat page at / (the API is unaffected)"
    )
    s.add_argument(
        "--log-level",
        default=d.log_level,
        choices=["debug", "info", "warning", "error"],
        help="logging level of every process",
    )
    s.add_argument(
        "--dp",
        "--dp-size",
        dest="dp",
        type=_positive_int,
        default=d.dp,
        help="data parallelism: N independent replicas (one per GPU, or a share of the CPU cores each) "
        "behind sglang-router on --port (needs the minisgl[router] extra)",
    )
    s.add_argument(
        "--router-policy",
        default=d.router_policy,
        choices=["cache_aware", "round_robin", "random", "power_of_two"],
        help="how sglang-router picks a replica with --dp",
    )
    s.add_argument(
        "--dp-rank",
        type=_non_negative_int,
        default=d.dp_rank,
        help="this replica's id in /metrics (label dp_rank) and /get_server_info; set by --dp, or by "
        "hand for replicas registered with a router you run yourself",
    )
    s.add_argument(
        "--shell",
        action="store_true",
        help="chat with the model in this terminal instead of serving (/reset, /set KEY VALUE, /exit)",
    )
    return p


def parse_args(argv: list[str] | None = None) -> ServerArgs:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if ns.node_rank >= ns.nnodes:
        parser.error(f"--node-rank must be < --nnodes ({ns.nnodes}), got {ns.node_rank}")
    if ns.nnodes > 1 and not ns.dist_init_addr:
        parser.error("--nnodes > 1 needs --dist-init-addr (host:port of node 0's rank 0)")
    if ns.tp % ns.nnodes:
        parser.error(f"--tp ({ns.tp}) must be a multiple of --nnodes ({ns.nnodes})")
    if ns.dp > 1 and ns.shell:
        parser.error("--dp serves over HTTP; it cannot be combined with --shell")
    if ns.dp > 1 and ns.nnodes > 1:
        parser.error("--dp runs every replica on this machine; it cannot be combined with --nnodes")
    known = {f.name for f in fields(ServerArgs)}
    return ServerArgs(**{k: v for k, v in vars(ns).items() if k in known})
