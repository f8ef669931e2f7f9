"""The offline Python API: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from minisgl.engine.config import EngineConfig
from minisgl.sampling_params import SamplingParams
from minisgl.distributed.replicated import make_scheduler


@dataclass
class Completion:
    """One generated sample. `token_ids` are generated ids only; `logprobs[i]` belongs to `token_ids[i]`."""

    text: str
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[float] | None = None
    top_logprobs: list[list[tuple[int, float]]] | None = None


@dataclass
class RequestOutput:
    """The result for one prompt: `outputs` holds its n samples; the shortcuts read the first."""

    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[Completion] = field(default_factory=list)

    @property
    def text(self) -> str:
        return self.outputs[0].text

    @property
    def token_ids(self) -> list[int]:
        return self.outputs[0].token_ids

    @property
    def finish_reason(self) -> str | None:
        return self.outputs[0].finish_reason

    @property
    def logprobs(self) -> list[float] | None:
        return self.outputs[0].logprobs


class LLM:
    """Loads a model once and generates for batches of prompts, continuously batched.

    `model` is a local checkpoint directory, a .gguf file, a Hugging Face repo id, or None for the
    embedded default model. Keyword arguments are EngineConfig fields. With `skip_tokenizer_init=True`
    (as in vLLM) prompts must be token ids and outputs carry no text: for benchmarks on a bare config.json.
    """

    def __init__(self, model: str | None = None, skip_tokenizer_init: bool = False, **kwargs: Any):
        self.config = EngineConfig(model=model, **kwargs)
        self.skip_tokenizer_init = skip_tokenizer_init
        self.scheduler = make_scheduler(self.config)
        self._tokenizer = None
        self._tokenizer_lock = threading.Lock()
        self._next_id = 0
        if self.config.grammar_backend != "none" and self.config.tp_size == 1 and not skip_tokenizer_init:
            from minisgl.grammar import create_backend

            mc = self.scheduler.model_config
            self.scheduler.enable_grammar(lambda: create_backend(
                self.config.grammar_backend, self.tokenizer, mc.vocab_size, list(mc.eos_token_ids)))

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (nothing to do with tp_size == 1)."""
        if hasattr(self.scheduler, "shutdown"):
            self.scheduler.shutdown()

    @property
    def tokenizer(self):
        with self._tokenizer_lock:  # the grammar pool's thread may load it at the same time (imports are not safe)
            if self._tokenizer is None:
                from minisgl.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(self.scheduler.engine.model_path, self.config.tokenizer)
        return self._tokenizer

    def generate(
        self,
        prompts: list[str] | list[list[int]] | str,
        sampling_params: SamplingParams | list[SamplingParams] | None = None,
        use_tqdm: bool | None = None,
    ) -> list[RequestOutput]:
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # type: ignore[list-item]
        params = sampling_params or SamplingParams()
        param_list = params if isinstance(params, list) else [params] * len(prompts)
        if len(param_list) != len(prompts):
            raise ValueError("pass one SamplingParams or one per prompt")
        self._check_grammars(param_list)
        results: dict[str, RequestOutput] = {}
        stops: dict[str, list[str]] = {}
        order: list[str] = []
        for prompt, p in zip(prompts, param_list):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = f"llm-{self._next_id}"
            self._next_id += 1
            self.scheduler.add_request(rid, ids, p)
            results[rid] = RequestOutput(
                prompt if isinstance(prompt, str) else None,
                ids,
                [Completion("", [], None, [] if p.logprobs else None, [] if p.logprobs else None) for _ in range(p.n)],
            )
            stops[rid] = p.stop
            order.append(rid)
        total = sum(p.n for p in param_list)
        show = use_tqdm if use_tqdm is not None else total >= 32
        bar = tqdm(total=total, desc="generate", disable=not show)
        pending = total
        while pending and self.scheduler.has_work():
            for out in self.scheduler.step():
                if out.error:
                    raise RuntimeError(f"request {out.rid} failed: {out.error}")
                comp = results[out.rid].outputs[out.index]
                if comp.finish_reason is not None:
                    continue  # finished early by a stop string
                comp.token_ids.extend(out.token_ids)
                if comp.logprobs is not None and out.logprobs is not None:
                    comp.logprobs.extend(out.logprobs)
                    comp.top_logprobs.extend(out.top_logprobs or [])
                if stops[out.rid] and self._hit_stop(comp, stops[out.rid]):
                    out.finished, out.finish_reason = True, "stop"
                    self.scheduler.abort(out.rid, out.index)
                if out.finished:
                    comp.finish_reason = out.finish_reason
                    pending -= 1
                    bar.update(1)
        bar.close()
        if hasattr(self.scheduler, "flush"):  # a surplus step may still hold finished requests' KV from the cache
            self.scheduler.flush()
        for rid in order:
            for comp in results[rid].outputs:
                if not comp.text and not self.skip_tokenizer_init:
                    comp.text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=True)
        return [results[rid] for rid in order]

    def _check_grammars(self, params: list[SamplingParams]) -> None:
        """Compile every request's grammar up front, so a bad one raises (ValueError) before anything runs."""
        from minisgl.grammar import GrammarSpec

        grammars = getattr(self.scheduler, "grammars", None)
        for p in params:
            p.validate()
            if p.grammar is None:
                continue
            if grammars is None:
                raise ValueError("structured output needs a grammar backend (grammar_backend='xgrammar') and tp_size 1")
            grammars.compiler.submit(GrammarSpec(*p.grammar)).result()

    def _hit_stop(self, comp: Completion, stops: list[str]) -> bool:
        text = self.tokenizer.decode(comp.token_ids, skip_special_tokens=True)
        cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=-1)
        if cut < 0:
            return False
        comp.text = text[:cut]
        return True
