"""The offline Python API: `LLM(model).generate(prompts, sampling_params)`."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from tqdm import tqdm

from minisgl.engine.config import EngineConfig
from minisgl.sampling_params import SamplingParams
from minisgl.scheduler.io import TokenOutput
from minisgl.scheduler.replicated import make_scheduler
from minisgl.tokenizer.detokenize import SampleText


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
            self.scheduler.enable_grammar(
                lambda: create_backend(
                    self.config.grammar_backend, self.tokenizer, mc.vocab_size, list(mc.eos_token_ids)
                )
            )

    def shutdown(self) -> None:
        """Stop tensor-parallel worker processes (nothing to do with tp_size == 1)."""
        self.scheduler.shutdown()

    @property
    def tokenizer(self):
        with self._tokenizer_lock:  # the grammar pool's thread may load it at the same time (imports are not safe)
            if self._tokenizer is None:
                from minisgl.tokenizer import load_tokenizer

                self._tokenizer = load_tokenizer(
                    self.scheduler.engine.model_path, self.config.tokenizer, self.config.trust_remote_code
                )
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
        texts: dict[tuple[str, int], SampleText] = {}
        for prompt, p in zip(prompts, param_list):
            ids = self.tokenizer.encode(prompt) if isinstance(prompt, str) else list(prompt)
            rid = self._add(ids, p)
            results[rid] = RequestOutput(
                prompt if isinstance(prompt, str) else None,
                ids,
                [Completion("", [], None, [] if p.logprobs else None, [] if p.logprobs else None) for _ in range(p.n)],
            )
            for i in range(p.n):
                texts[rid, i] = self._sample_text(p)
        show = use_tqdm if use_tqdm is not None else len(texts) >= 32
        with tqdm(total=len(texts), desc="generate", disable=not show) as bar:
            for out, piece, finish_reason in self._run(texts):
                comp = results[out.rid].outputs[out.index]
                comp.token_ids.extend(out.token_ids)
                if comp.logprobs is not None and out.logprobs is not None:
                    comp.logprobs.extend(out.logprobs)
                    comp.top_logprobs.extend(out.top_logprobs or [])
                comp.text += piece
                if finish_reason is not None:
                    comp.finish_reason = finish_reason
                    bar.update(1)
        return list(results.values())

    def stream(self, prompt_ids: list[int], params: SamplingParams) -> Iterator[tuple[str, int, str | None]]:
        """Generate one sample (n must be 1), yielding (text delta, tokens generated, finish reason or None) as
        the tokens arrive. Closing the iterator early (or an exception in the caller, e.g. Ctrl-C) aborts it."""
        if params.n != 1:
            raise ValueError("stream() generates one sample; use generate() for n > 1")
        rid = self._add(prompt_ids, params)
        for out, piece, finish_reason in self._run({(rid, 0): self._sample_text(params)}):
            yield piece, len(out.token_ids), finish_reason

    def _add(self, prompt_ids: list[int], params: SamplingParams) -> str:
        if self.skip_tokenizer_init and params.stop:
            raise ValueError("stop strings need the tokenizer (skip_tokenizer_init=True)")
        rid = f"llm-{self._next_id}"
        self._next_id += 1
        self.scheduler.add_request(rid, prompt_ids, params)
        return rid

    def _sample_text(self, params: SamplingParams) -> SampleText | None:
        if self.skip_tokenizer_init:
            return None
        return SampleText.for_params(self.tokenizer, params, self.scheduler.model_config.eos_token_ids)

    def _run(self, samples: dict[tuple[str, int], SampleText | None]) -> Iterator[tuple[TokenOutput, str, str | None]]:
        """Step the scheduler until every sample in `samples` has ended; yield (output, its text, the sample's
        finish reason once it has ended). A sample whose text runs into a stop string ends there ("stop") and
        is aborted in the scheduler. If the caller stops iterating, the samples left are aborted."""
        pending = set(samples)
        try:
            while pending and self.scheduler.has_work():
                for out in self.scheduler.step():
                    key = (out.rid, out.index)
                    if key not in pending:
                        continue  # ended early by a stop string: the abort's own output
                    if out.error:
                        raise RuntimeError(f"request {out.rid} failed: {out.error}")
                    text = samples[key]
                    piece, hit_stop = text.feed(out.token_ids, out.finished, out.finish_reason) if text else ("", False)
                    if hit_stop and not out.finished:
                        self.scheduler.abort(out.rid, out.index)
                    finished = out.finished or hit_stop
                    if finished:
                        pending.discard(key)
                    yield out, piece, ("stop" if hit_stop else out.finish_reason) if finished else None
        finally:
            for rid, index in pending:
                self.scheduler.abort(rid, index)
            while self.scheduler.has_work():  # settle the step in flight, so the next call starts clean
                self.scheduler.step()

    def _check_grammars(self, params: list[SamplingParams]) -> None:
        """Compile every request's grammar up front, so a bad one raises (ValueError) before anything runs."""
        from minisgl.grammar import GrammarSpec

        grammars = self.scheduler.grammars
        for p in params:
            p.validate()
            if p.grammar is None:
                continue
            if grammars is None:
                raise ValueError("structured output needs a grammar backend (grammar_backend='xgrammar') and tp_size 1")
            grammars.compiler.submit(GrammarSpec(*p.grammar)).result()
