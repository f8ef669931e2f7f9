"""The model runner: loads a checkpoint onto a device, sizes the KV pool, runs one forward per step."""

from __future__ import annotations

import ctypes
import dataclasses
import logging
import os
import sys
import time

import psutil
import torch
import torch.distributed as dist

from minisgl.attention import create_backend, default_backend
from minisgl.core.cpu_threads import CpuShare, ThreadProbe, cgroup_cpu_quota, default_threads
from minisgl.core.forward_batch import ForwardBatch
from minisgl.distributed.info import TPInfo
from minisgl.engine import cpu_runner
from minisgl.engine.config import EngineConfig
from minisgl.engine.sampling import PendingTokens, SamplingBatch, TokenMask, sample
from minisgl.kvcache.pool import KVPool
from minisgl.models.config import DTYPES, ModelConfig, load_model_config, resolve_dtype
from minisgl.models.gguf import gguf_weight_types
from minisgl.models.hub import resolve_model_path
from minisgl.models.registry import model_class
from minisgl.models.weights import fill_dummy_weights, iter_weights
from minisgl.quant import QuantConfig, resolve_quant_config

logger = logging.getLogger(__name__)

# Without --max-total-tokens the CPU pool holds llama.cpp's default context (-c 4096): host memory is shared
# with everything else, and a prefix cache that keeps every finished sequence soon makes the whole pool resident.
_CPU_KV_DEFAULT_TOKENS = 4096
# Pages of one token let a long-running server scatter a sequence's KV rows through the pool as pages are freed
# and reused, and CPU decode attention then slows by half as its reads stop streaming; pages of 16 keep runs of 16
# rows contiguous whatever the order pages come back in.
_CPU_PAGE_SIZE = 16
# A prefill step holds every running request's next token back while it runs; on a CPU a 2048-token step takes
# seconds, a 512-token one (llama.cpp's default micro-batch) a fraction, for a little more time to a long
# prompt's first token (docs/benchmarks.md).
_CPU_CHUNKED_PREFILL = 512
_CUDA_CHUNKED_PREFILL = 2048


def _set_malloc_thresholds(mmap_bytes: int, trim_bytes: int) -> None:
    """glibc's M_MMAP_THRESHOLD / M_TRIM_THRESHOLD (fixing them turns off glibc's own adaptation)."""
    if sys.platform != "linux":
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(-3, mmap_bytes)
        libc.mallopt(-1, trim_bytes)
    except (OSError, AttributeError):  # not glibc
        pass


def _log_cpu_choices(requested: str, dtype: torch.dtype, quant: QuantConfig | None, threads_why: str) -> None:
    """Say which native kernel level and activation dtype this CPU engine runs, and why."""
    from minisgl.kernels import native

    level, why = native.requested_level()
    loaded = native.level()
    if loaded != level:
        why = f"{level} was asked for ({why}) but its library did not load"
    if requested != "auto":
        dtype_why = f"--dtype {requested}"
    elif native.has_native_bf16():
        dtype_why = "--dtype auto, and the CPU computes bf16 natively (AVX512-BF16/AMX)"
    else:
        dtype_why = "--dtype auto, and the CPU has no native bf16 (emulated bf16 is slower than fp32)"
    if quant is not None and quant.int8_activations:
        dtype_why += "; int4/int8 matmuls round them to int8 per 32 as llama.cpp does (a named --dtype: exact ones)"
    wait = ", ".join(f"{v}={os.environ[v]}" for v in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT") if v in os.environ)
    logger.info("CPU kernels: %s (%s); activations %s (%s); %d threads (%s), waits: %s", loaded, why, dtype,
                dtype_why, torch.get_num_threads(), threads_why, wait)  # fmt: skip


_KV_DTYPES = {**DTYPES, "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "half": torch.float16}


def resolve_kv_cache_dtype(name: str, dtype: torch.dtype, device: torch.device, llama_numerics: bool):
    """(the KV cache's dtype, why) for --kv-cache-dtype `name` and activations of `dtype`. `auto` keeps the
    activations' dtype, so attention sees exactly what the model computed, except where the engine already runs
    llama.cpp's numerics on fp32 activations (llama_numerics: --dtype auto, quantized weights, a CPU): there fp16,
    llama.cpp's own cache type, which halves what decode attention reads at every step. Only the CPU attention
    backends read a cache of another dtype than the activations'."""
    if name == "auto":
        if llama_numerics and dtype == torch.float32:
            return torch.float16, ("--kv-cache-dtype auto: fp16, llama.cpp's cache type, as --dtype auto computes as "
                                   "llama.cpp does here; a named --dtype keeps the cache in it")  # fmt: skip
        return dtype, "--kv-cache-dtype auto: the activations' dtype"
    if name not in _KV_DTYPES:
        raise ValueError(f"unknown kv_cache_dtype {name!r}; choose auto, {', '.join(_KV_DTYPES)}")
    kv = _KV_DTYPES[name]
    if kv != dtype and device.type != "cpu":
        raise ValueError(f"kv_cache_dtype {name} differs from the activations' {dtype}: only on the CPU")
    return kv, f"--kv-cache-dtype {name}"


class Engine:
    """Owns the model, the KV pool and the attention backend of one rank. Knows nothing about requests."""

    def __init__(self, config: EngineConfig, tp: TPInfo = TPInfo()):
        self.config = config
        self.tp = tp
        self.device = config.resolved_device()
        self.model_path = resolve_model_path(config.model)
        self.model_config: ModelConfig = load_model_config(self.model_path)
        self.dtype = resolve_dtype(config.dtype, self.model_config, self.device)
        gguf_types = gguf_weight_types(self.model_path) if self.model_path.endswith(".gguf") else None
        self.quant = resolve_quant_config(config.quantization, config.quantize_lm_head, gguf_types, self.device)
        if self.device.type == "cpu" and config.dtype == "auto" and self.quant is not None:
            # llama.cpp's numerics (Q8 activations) for speed unless the user named a dtype to compute in
            self.quant = dataclasses.replace(self.quant, int8_activations=True)
        llama_numerics = self.quant is not None and self.quant.int8_activations
        self.kv_dtype, kv_why = resolve_kv_cache_dtype(config.kv_cache_dtype, self.dtype, self.device, llama_numerics)
        self.cpu_share: CpuShare | None = None
        self.thread_probe: ThreadProbe | None = None
        if self.device.type == "cpu":
            threads = config.cpu_threads or default_threads()
            if threads < 1:
                raise ValueError(f"cpu_threads must be at least 1, not {threads}")
            torch.set_num_threads(threads)
            if config.cpu_threads is None:  # a number the user chose stays fixed
                self.cpu_share = CpuShare(threads)
                self.thread_probe = ThreadProbe() if config.cpu_spare_core else None
                quota = cgroup_cpu_quota()
                threads_why = "the cores it may use" + ("" if quota is None else f", CPU quota {quota:g} cores")
            else:
                threads_why = "--cpu-threads"
            _log_cpu_choices(config.dtype, self.dtype, self.quant, threads_why)
        cfg = self.model_config
        self.max_model_len = min(config.max_model_len or cfg.max_model_len, cfg.max_model_len)

        start = time.perf_counter()
        self.model = self._load_model()
        self.load_seconds = time.perf_counter() - start
        scheme = self.quant.scheme if self.quant else "none"
        logger.info(
            "loaded %s (%s, %s, quantization %s) in %.2fs",
            self.model_path, cfg.architecture, self.dtype, scheme, self.load_seconds,
        )  # fmt: skip

        num_kv_heads = max(1, cfg.num_kv_heads // tp.size)
        num_q_heads = cfg.num_q_heads // tp.size
        self.page_size = config.page_size or (_CPU_PAGE_SIZE if self.device.type == "cpu" else 1)
        self.chunked_prefill_size = config.chunked_prefill_size or (
            _CPU_CHUNKED_PREFILL if self.device.type == "cpu" else _CUDA_CHUNKED_PREFILL
        )
        num_pages = self._num_pages(num_kv_heads)
        self.pool = KVPool(
            cfg.num_layers, num_pages, self.page_size, num_kv_heads, cfg.head_dim, self.kv_dtype, self.device
        )
        name = config.attention_backend or default_backend(self.device)
        self.attn_backend = create_backend(
            name, self.pool, num_q_heads, num_kv_heads, cfg.head_dim, cfg.head_dim**-0.5, self.dtype
        )
        logger.info("KV pool: %d pages of %d tokens, %s (%s), attention backend %s", num_pages, self.page_size,
                    self.kv_dtype, kv_why, name)  # fmt: skip
        self.cpu_runner = None
        if self.device.type == "cpu":
            self.cpu_runner = cpu_runner.build(self.model, self.pool, self.attn_backend)
            if self.cpu_runner is not None:
                logger.info("decode runs each decoder layer as one native call (engine/cpu_runner.py)")
        self.graph_runner = self._maybe_capture_graphs(config)

    def _maybe_capture_graphs(self, config: EngineConfig):
        """Decode CUDA graphs need a backend whose decode reads only batch tensors (no host metadata), and a
        model with no host syncs in its forward (the MoE's per-expert loop has one)."""
        if self.device.type != "cuda" or config.cuda_graph_max_bs <= 0:
            return None
        if not getattr(self.attn_backend, "supports_cuda_graph", False) or any(
            type(m).__name__ == "MoE" for m in self.model.modules()
        ):
            logger.info("decode CUDA graphs disabled for this backend/model")
            return None
        from minisgl.engine.graph import CudaGraphRunner

        max_bs = min(config.cuda_graph_max_bs, config.max_running_requests)
        max_pages = -(-self.max_model_len // self.page_size)
        return CudaGraphRunner(self.model, self.attn_backend, max_bs, max_pages, self.page_size, self.device)

    def _load_model(self) -> torch.nn.Module:
        # Loading streams weights through many same-sized transient buffers; glibc would move them from mmap
        # to its heap after the first few frees and keep their memory, raising the load's peak RSS by
        # hundreds of MB. Small thresholds during the load return each buffer to the OS when freed; large ones
        # afterwards keep a step's activations in the heap (mmap'ing them afresh every step costs page faults).
        _set_malloc_thresholds(1 << 20, 1 << 20)
        try:
            return self._build_and_load()
        finally:
            _set_malloc_thresholds(32 << 20, 64 << 20)

    def _build_and_load(self) -> torch.nn.Module:
        cls = model_class(self.model_config.architecture)
        prev = torch.get_default_dtype()
        torch.set_default_dtype(self.dtype)
        try:
            with torch.device(self.device):
                model = cls(self.model_config, self.tp, self.device, self.quant)
                if self.quant is not None:
                    model.bind_quant(self.quant, self.device, self.dtype)
        finally:
            torch.set_default_dtype(prev)
        if self.config.load_format == "dummy":
            fill_dummy_weights(model, self.config.seed, self.device)
        elif self.config.load_format in ("auto", "safetensors", "gguf"):
            model.load_weights(iter_weights(self.model_path, self.dtype, keep_quantized=self.quant is not None))
        else:
            raise ValueError(f"unknown load_format {self.config.load_format!r}; choose auto or dummy")
        if self.quant is not None and self.device.type == "cuda":
            torch.cuda.empty_cache()  # quantization temporaries: the KV pool is sized from what is really free
        return model.eval()

    def _num_pages(self, num_kv_heads: int) -> int:
        cfg, ps = self.model_config, self.page_size
        per_page = KVPool.bytes_per_page(cfg.num_layers, ps, num_kv_heads, cfg.head_dim, self.kv_dtype)

        def pages_for(tokens: int) -> int:
            return -(-tokens // ps) + 1  # +1: page 0 is scratch

        if self.config.max_total_tokens:
            return pages_for(self.config.max_total_tokens)
        fraction = self.config.mem_fraction_static
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            pages = int(free * fraction // per_page)
        else:
            pages = min(
                int(psutil.virtual_memory().available * fraction // per_page), pages_for(_CPU_KV_DEFAULT_TOKENS)
            )
        if pages < 2:
            raise RuntimeError("not enough memory left for even one KV page; lower the model size or free memory")
        return pages

    @torch.inference_mode()
    def sample(self, logits: torch.Tensor, batch: SamplingBatch, mask: TokenMask | None = None) -> PendingTokens:
        """Pick one token per row of `logits` (see sampling.sample). Under tensor parallelism every rank goes on
        with rank 0's tokens, whatever floating-point rounding did elsewhere, so their states never diverge."""
        result = sample(logits, batch, mask)
        if self.tp.size > 1:
            dist.broadcast(result.token_ids, src=0)
        return PendingTokens(result)

    def _set_cpu_threads(self, batch: ForwardBatch) -> None:
        """The kernel threads for this step: the cores other processes leave free (CpuShare); under
        `cpu_spare_core`, for a decode step of one request, that or one fewer, whichever runs faster here."""
        if (threads := self.cpu_share.poll()) is not None:
            # debug, not info: it changes whenever another process comes and goes (and would cut into the shell's
            # streamed answers)
            logger.debug("CPU kernel threads: %d of %d (other processes keep the rest busy)", threads,
                         self.cpu_share.max_threads)  # fmt: skip
        threads = self.cpu_share.threads
        if self.thread_probe is not None:
            if batch.is_decode and batch.batch_size == 1:
                threads = self.thread_probe.next(threads)
            else:
                self.thread_probe.interrupt()
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)

    def forward(self, batch: ForwardBatch) -> torch.Tensor:
        """Run the model on one batch; returns float32 logits [len(batch.logits_index), vocab]."""
        if self.graph_runner is not None and self.graph_runner.can_run(batch):
            return self.graph_runner.run(batch)
        if self.cpu_share is not None:
            self._set_cpu_threads(batch)
        batch.attn_backend = self.attn_backend
        self.attn_backend.prepare(batch)
        if self.cpu_runner is not None and self.cpu_runner.can_run(batch):
            return self.cpu_runner.run(batch)
        return self.model(batch)
