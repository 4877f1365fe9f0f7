"""vLLM backend: vLLM's async engine in-process behind the same interface as the transformers engine.

Our API layer keeps doing auth, limits, errors, streaming format and drain; this module only turns
`generate` calls into vLLM requests. vLLM's scheduler does the batching (max_num_seqs = max_batch_size);
the waiting queue is bounded here so overflow is refused at once with 429, as with the other backend.
vLLM's usage-statistics reporting is switched off before vLLM is imported: private deployments must not
phone home.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import weakref
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.engine import (
    EngineUnavailableError,
    FinishReason,
    GenerationChunk,
    HFTokenization,
    QueueFullError,
    SamplingParams,
    TokenLogprob,
)
from app.engine.accounting import EngineAccounting
from app.engine.loader import ModelLoadError, resolve_model_folder
from app.metrics import Metrics

log = logging.getLogger(__name__)

# Read by vLLM at import time.
os.environ["VLLM_NO_USAGE_STATS"] = "1"
os.environ["DO_NOT_TRACK"] = "1"


@dataclass
class _Admission:
    started: bool = False


@dataclass(frozen=True)
class VLLMOptions:
    model_path: str
    cache_dir: Path
    compile_cache_dir: Path
    served_model_name: str | None
    dtype: str
    max_model_len: int | None
    max_num_seqs: int
    max_queued_requests: int
    gpu_memory_utilization: float
    tensor_parallel_size: int
    enable_prefix_caching: bool
    cpu_kv_cache_gib: int


def _vllm_dtype(dtype: str) -> str:
    """`auto` means what it means for the transformers backend: float32 on CPUs. vLLM's own `auto` picks
    bfloat16 there, which on CPUs without native bf16 is emulated, and with the embedded model (dequantised
    from 4-bit) visibly worse: asked for France's capital it answered "L'Étoile, la Marseillaise, ..."
    where float32 answers "The capital of France is Paris."."""
    if dtype != "auto":
        return dtype
    return "auto" if _cuda_available() else "float32"


def _cuda_available() -> bool:
    import torch

    return bool(torch.cuda.is_available())


def vllm_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


class VLLMEngine(HFTokenization):
    def __init__(self, options: VLLMOptions, metrics: Metrics) -> None:
        folder, self.model_name = resolve_model_folder(
            options.model_path, cache_dir=options.cache_dir, name=options.served_model_name
        )
        # torch keeps the kernels it compiles under /tmp by default, which the unit's PrivateTmp (and a
        # container's tmpfs) empties at every start: a restart on a CPU host compiled for ~100 s more
        # (measured: 170 s to ready with an empty cache, 70 s with a kept one, on two idle cores).
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(options.compile_cache_dir / "torchinductor")
        os.environ["VLLM_CACHE_ROOT"] = str(options.compile_cache_dir / "vllm")
        # CPU builds size their KV cache from this variable (GiB) instead of a memory fraction.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(options.cpu_kv_cache_gib))
        if not _cuda_available():
            # vLLM 0.32 on CPUs cannot load the ahead-of-time compile cache it writes ("'function' object has
            # no attribute 'finalize_loading'") and compiles the model again at every start, ~100 s on two
            # cores; its older compile cache loads, and a restart's engine start takes ~30 s instead.
            os.environ.setdefault("VLLM_USE_AOT_COMPILE", "0")
        try:
            from vllm import AsyncEngineArgs
            from vllm.v1.engine.async_llm import AsyncLLM
        except ImportError as exc:
            raise ModelLoadError(f"engine 'vllm' was chosen but vLLM cannot be imported: {exc}") from exc

        args = AsyncEngineArgs(
            model=str(folder),
            served_model_name=self.model_name,
            dtype=_vllm_dtype(options.dtype),
            max_model_len=options.max_model_len,
            max_num_seqs=options.max_num_seqs,
            gpu_memory_utilization=options.gpu_memory_utilization,
            tensor_parallel_size=options.tensor_parallel_size,
            enable_prefix_caching=options.enable_prefix_caching,
        )
        self._accounting = EngineAccounting(metrics, self.model_name)
        self._max_running = options.max_num_seqs
        self._max_waiting = options.max_queued_requests
        self._engine: Any = AsyncLLM.from_engine_args(args, stat_loggers=[_stat_logger_factory(self._accounting)])
        self._tokenizer: Any = self._engine.get_tokenizer()
        self.context_length = int(self._engine.model_config.max_model_len)
        self._active = 0
        self._warm = False
        self._stopping = False
        self._failed: str | None = None
        self._aborts: set[asyncio.Task[None]] = set()

    # --- lifecycle -----------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self.measure_tokenizer)
        async for _ in self.generate(self.encode_prompt("Hello"), SamplingParams(max_tokens=4, temperature=0.0)):
            pass
        self._warm = True

    async def shutdown(self) -> None:
        self._stopping = True
        self._engine.shutdown()

    def failure(self) -> str | None:
        if self._failed is None and self._engine.errored:
            self._failed = f"engine failure: {type(self._engine.dead_error).__name__}"
        return self._failed

    def is_ready(self) -> bool:
        return self._warm and not self._stopping and self.failure() is None

    def busy_for(self) -> float:
        # vLLM's engine core runs in a process of its own, watched by vLLM: a dead one shows in failure().
        return 0.0

    # --- submission ----------------------------------------------------------------------------------
    def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[GenerationChunk]:
        if self._stopping or self.failure() is not None:
            raise EngineUnavailableError(self._failed or "engine is not running")
        waiting = self._active - self._max_running
        if waiting >= self._max_waiting:
            raise QueueFullError(f"{waiting} requests are already waiting")
        self._active += 1
        self._update_gauges()
        admission = _Admission()
        stream = self._stream(prompt_ids, params, admission)
        # A stream that is never iterated (client gone before the response started) never runs its
        # `finally`: give its place back when the stream object goes away.
        weakref.finalize(stream, self._release_unstarted, admission)
        return stream

    def _release(self) -> None:
        self._active -= 1
        self._update_gauges()

    def _release_unstarted(self, admission: _Admission) -> None:
        if not admission.started:
            self._release()

    def _account_queue_time(self, output: Any) -> None:
        """From the engine core's own timestamps, read with the request's first output: known before the
        answer is, unlike what vLLM's stat loggers report a step later."""
        stats = getattr(output, "metrics", None)
        queued, scheduled = getattr(stats, "queued_ts", 0.0), getattr(stats, "scheduled_ts", 0.0)
        if queued and scheduled:
            self._accounting.queued(scheduled - queued)

    def _update_gauges(self) -> None:
        # Our own count, so a cancelled request leaves the gauges at once (vLLM reports on its next step).
        self._accounting.load(min(self._active, self._max_running), max(0, self._active - self._max_running))

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, admission: _Admission
    ) -> AsyncIterator[GenerationChunk]:
        admission.started = True
        from vllm import SamplingParams as VLLMSamplingParams
        from vllm.sampling_params import RequestOutputKind

        request_id = secrets.token_hex(8)
        sampling = VLLMSamplingParams(
            max_tokens=params.max_tokens,
            temperature=params.temperature,
            top_p=params.top_p,
            stop=list(params.stop) or None,
            seed=params.seed,
            top_k=params.top_k,
            min_p=params.min_p,
            presence_penalty=params.presence_penalty,
            frequency_penalty=params.frequency_penalty,
            repetition_penalty=params.repetition_penalty,
            logprobs=params.logprobs,
            output_kind=RequestOutputKind.DELTA,
        )
        account = self._accounting.request(len(prompt_ids))
        finished = False
        try:
            async for output in self._engine.generate({"prompt_token_ids": prompt_ids}, sampling, request_id):
                completion = output.outputs[0]
                if account.generated == 0:
                    self._account_queue_time(output)
                account.tokens(len(completion.token_ids))
                logprobs = _logprobs_of(completion, params.logprobs) if params.logprobs is not None else ()
                if not output.finished:
                    if completion.text or logprobs:
                        yield GenerationChunk(text=completion.text, logprobs=logprobs)
                    continue
                finished = True
                reason: FinishReason = "length" if completion.finish_reason == "length" else "stop"
                if reason == "stop" and not isinstance(completion.stop_reason, str) and logprobs:
                    # Ended by a token (end of sequence, or one of the model's stop tokens, whose id vLLM gives
                    # as stop_reason) rather than a stop string: that token is no part of the answer.
                    logprobs = logprobs[:-1]
                account.finished(reason)
                yield GenerationChunk(
                    text=completion.text,
                    finish_reason=reason,
                    prompt_tokens=len(prompt_ids),
                    completion_tokens=account.generated,
                    logprobs=logprobs,
                )
                return
            if not finished:
                raise EngineUnavailableError("vLLM ended the request without finishing it")
        except Exception as exc:
            log.exception("vLLM request failed")
            if self._engine.errored:
                self._failed = f"engine failure: {type(exc).__name__}"
            finished = True  # nothing left to abort
            account.finished("error")
            yield GenerationChunk(text="", error=self._failed or f"engine error: {type(exc).__name__}")
        finally:
            self._release()
            if not finished:
                account.finished("abort")
                # Client gone or consumer stopped early: free the sequence's slot and KV blocks now. A task,
                # because a generator being closed may not await.
                task = asyncio.get_running_loop().create_task(self._engine.abort(request_id))
                self._aborts.add(task)
                task.add_done_callback(self._aborts.discard)


def _logprobs_of(completion: Any, alternatives: int) -> tuple[TokenLogprob, ...]:
    """vLLM gives, per generated token, a map of token id to Logprob holding the sampled token and the
    likeliest ones (rank 1 first); the sampled one may be among them."""
    found = []
    for token_id, position in zip(completion.token_ids, completion.logprobs or (), strict=False):
        ranked = sorted((entry for entry in position.values() if entry.rank is not None), key=lambda e: e.rank)
        top = tuple((entry.decoded_token or "", entry.logprob) for entry in ranked[:alternatives])
        chosen = position[token_id]
        found.append(TokenLogprob(chosen.decoded_token or "", chosen.logprob, top))
    return tuple(found)


def _stat_logger_factory(accounting: EngineAccounting) -> Any:
    """vLLM calls its stat loggers once per engine step: the per-step batch size and the KV cache's use
    come from there (their classes are not a stable vLLM interface: read defensively)."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class _StepStats(StatLoggerBase):  # type: ignore[misc]  # vLLM is untyped where it is not installed
        def __init__(self, vllm_config: Any, engine_index: int = 0) -> None:
            pass

        def record(
            self,
            scheduler_stats: Any,
            iteration_stats: Any,
            mm_cache_stats: Any = None,
            engine_idx: int = 0,
        ) -> None:
            generated = int(getattr(iteration_stats, "num_generation_tokens", 0) or 0)
            if scheduler_stats is not None:
                if generated:
                    accounting.step(int(getattr(scheduler_stats, "num_running_reqs", 0) or 0))
                accounting.kv_cache_usage(float(getattr(scheduler_stats, "kv_cache_usage", 0.0) or 0.0))

        def log_engine_initialized(self) -> None:
            pass

    return _StepStats
