"""LLMEngine: the public entry point. add_request / abort_request / step / has_unfinished_requests.

Each step schedules tokens across every live request (continuous batching at token level), runs one forward pass,
samples, detokenizes, and returns the outputs of the requests that advanced.
"""
from __future__ import annotations

import atexit
import gc
import itertools
import logging
import weakref
from concurrent import futures
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from engine.attention import select_backend
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.decode_graphs import DecodeGraphs, graph_batch_sizes, graphs_supported
from engine.detokenizer import IncrementalDetokenizer
from engine.device import resolve_device, resolve_dtype, use_device
from engine.kv_cache import KVCacheSpec, allocate_kv_cache, num_blocks_for_budget
from engine.loader import effective_low_bit, eos_token_ids, load_config, load_model, load_tokenizer
from engine.low_bit import compute_dtype
from engine.model_runner import ModelRunner
from engine.models import model_class
from engine.outputs import CompletionOutput, RequestOutput
from engine.request import Request, RequestStatus
from engine.sampler import PendingSample, Sampler, SamplingRow, uses_penalties
from engine.sampling_params import SamplingParams
from engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput

if TYPE_CHECKING:
    from engine.structured_output import StructuredOutputs
    from engine.tensor_parallel import TensorParallel

log = logging.getLogger(__name__)

# Engines freeze the heap (see LLMEngine.__init__); at exit it is handed back, so that the interpreter's last
# collection frees it (native extensions such as Triton's report whatever was never freed).
atexit.register(gc.unfreeze)


@dataclass(slots=True, eq=False)
class _LaunchedStep:
    """A step whose forward pass is queued on the device, and then its sampling (_sample); _finish reads its
    tokens."""

    scheduled: SchedulerOutput
    chunks: list[ScheduledChunk]  # in the order the runner ran them
    sampling: list[Request]  # the requests that sample a token, in the order of the logits rows
    logits: torch.Tensor  # [len(sampling), vocab] on the device
    prompt_logprobs: list  # (chunk, log-probs [num_tokens, vocab]) of the prompt chunks scored (ModelRunner.execute)
    pending: PendingSample | None = None  # set by _sample


@dataclass(slots=True, eq=False)
class _Group:
    """One add_request call: its n choices, and how much of each the caller has already been sent."""

    request_id: str
    prompt_token_ids: list[int]
    choices: list[Request]
    sent_tokens: list[int]
    sent_text: list[str]
    # Whether the caller wants an output after every step; otherwise only after its first token and at its end
    # (and every `checkpoint_every` tokens, when set).
    stream: bool = True
    checkpoint_every: int | None = None

    def wants_output(self) -> bool:
        """After a step that advanced it: whether the caller gets an output now."""
        if self.stream or self.finished or not any(self.sent_tokens):
            return True
        every = self.checkpoint_every
        return every is not None and any(r.num_output_tokens - sent >= every
                                         for r, sent in zip(self.choices, self.sent_tokens))

    @property
    def finished(self) -> bool:
        return all(r.status.finished for r in self.choices)


class LLMEngine:
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = resolve_device(config.device)
        use_device(self.device)
        self.hf_config = hf_config = load_config(config.model)
        # A quantized checkpoint (pre-quantized directory, GGUF file) runs in its own format.
        self.load_in_low_bit = low_bit = effective_low_bit(hf_config, config.load_in_low_bit)
        self.dtype = resolve_dtype(config.dtype, _checkpoint_dtype(hf_config), self.device)
        if low_bit:
            self.dtype = compute_dtype(low_bit, self.device, self.dtype, config.dtype != "auto")
        # Tensor parallel: this process is rank 0, the followers its children (engine/tensor_parallel.py).
        self.tensor_parallel: TensorParallel | None = None
        if config.tensor_parallel_size > 1:
            self.tensor_parallel = self._start_tensor_parallel()
        try:
            self._build()
        except BaseException:
            self.shutdown()
            raise

    def _start_tensor_parallel(self) -> TensorParallel:
        from engine.tensor_parallel import rank_devices, start_leader  # torch.distributed only when asked for

        size = self.config.tensor_parallel_size
        rank_devices(self.device, size)  # enough devices, then a model they can split
        model_class(self.hf_config.architectures).check_tensor_parallel(self.hf_config, size)
        tp = start_leader(self.config, self.device)
        weakref.finalize(self, tp.shutdown)  # an engine never shut down still ends its followers (at exit, too)
        try:
            # What the followers load, as this rank does: the same format, dtype and activation reserve.
            tp.broadcast({"config": self.config, "dtype": self.dtype, "low_bit": self.load_in_low_bit,
                          "activation_reserve": self._activation_reserve()})
        except BaseException:
            tp.shutdown()
            raise
        return tp

    def shutdown(self) -> None:
        """End the engine's tensor-parallel followers (nothing without tensor parallelism)."""
        if self.tensor_parallel is not None:
            self.tensor_parallel.shutdown()

    def _build(self) -> None:
        config, hf_config, low_bit, tp = self.config, self.hf_config, self.load_in_low_bit, self.tensor_parallel
        self.model = load_model(config.model, hf_config, self.device, self.dtype, low_bit, tp)
        self.tokenizer = (None if config.skip_tokenizer_init
                          else load_tokenizer(config.tokenizer or config.model))
        self.eos_token_ids = eos_token_ids(config.model, hf_config)
        self.vocab_size = hf_config.vocab_size

        attention = self.model.model.layers[0].self_attn
        spec = KVCacheSpec(len(self.model.model.layers), attention.num_kv_heads, attention.head_dim,
                           config.block_size, self.dtype)
        num_blocks = num_blocks_for_budget(spec, self.device, num_blocks=config.num_kv_blocks,
                                           gpu_memory_utilization=config.gpu_memory_utilization,
                                           cpu_bytes=config.cpu_kv_cache_bytes,
                                           activation_reserve=self._activation_reserve())
        if tp is not None:
            num_blocks = _agree_num_blocks(tp, num_blocks)
        self.max_model_len = self._max_model_len(num_blocks * config.block_size)
        block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        self.scheduler = Scheduler(block_manager, config.max_num_seqs, config.max_num_batched_tokens)
        backend = select_backend(config.attention_backend, self.device)
        graphs = not config.enforce_eager and graphs_supported(self.device, backend)
        max_blocks_per_seq = -(-self.max_model_len // config.block_size)
        if tp is not None:  # the followers build the same cache and capture the same graphs, in the same order
            tp.broadcast({"num_blocks": num_blocks, "max_blocks_per_seq": max_blocks_per_seq,
                          "graph_sizes": graph_batch_sizes(config.max_num_seqs) if graphs else None})
        kv_caches = allocate_kv_cache(spec, num_blocks, self.device)
        self.runner = ModelRunner(self.model, kv_caches, backend, config.block_size, self.device)
        self.runner.tensor_parallel = tp
        if graphs:
            self.runner.graphs = DecodeGraphs(self.model, kv_caches, backend, self.device, max_blocks_per_seq,
                                              collectives=tp is not None)
            self.runner.graphs.capture(graph_batch_sizes(config.max_num_seqs))
        self.sampler = Sampler(torch.Generator(self.device).manual_seed(config.seed))
        self._groups: dict[str, _Group] = {}
        self._arrivals = itertools.count()
        self._pending: list[RequestOutput] = []
        # Async scheduling (see step()); off on the CPU, where nothing runs asynchronously: it would only hold
        # each output back by one step.
        self.async_scheduling = (config.async_scheduling if config.async_scheduling is not None
                                 else self.device.type != "cpu")
        self._ahead: _LaunchedStep | None = None  # the step queued ahead, finished by the next step() call
        self._structured: StructuredOutputs | None = None  # built with the first structured-output request
        # Requests whose grammar is compiling, with its Future: they enter the scheduler once it is ready.
        self._compiling: list[tuple[Future, list[Request]]] = []
        self.last_step_batch_size = 0  # requests that computed tokens in the last step (for metrics)
        if tp is not None:
            tp.ready = True  # the followers wait for steps now: shutdown can tell them to stop
        if self.device.type != "cpu":
            self._warm_up()
        # Everything alive now (model, caches, graphs, libraries) lives as long as the process: keep it out of the
        # garbage collector's full passes, which otherwise stall a GPU step ~0.2 s now and then and cost a CPU step
        # at batch 256 about a third of its time (profiled on a 2-core VM, tiny demo model: each step makes many small
        # objects, so collections run often).
        gc.freeze()

    # ---- requests in and out ----

    def add_request(self, request_id: str, prompt: str | list[int], params: SamplingParams | None = None,
                    priority: int = 0, stream: bool = True, resume: list[list[int]] | None = None,
                    checkpoint_every: int | None = None) -> None:
        """Queue a prompt (text or token ids). ValueError for a bad request; the engine state is then unchanged.
        With `stream=False`, step() returns this request's output only after its first token and once finished
        (the later one carries everything): building an output for every request at every step is a large part
        of a big batch's host time, wasted on callers that only want results. `checkpoint_every`: such a request
        also gets an output once a choice has that many tokens more than its last output held (what a worker
        persists to resume the request after a crash).

        `resume`: per choice, the tokens an earlier run of this same request generated (a run that died): they
        continue as if this engine had generated them (see _resume). The first output carries them with their
        text; max_tokens counts them."""
        params = params or SamplingParams()
        if request_id in self._groups:
            raise ValueError(f"request id {request_id!r} is already in use")
        if resume is not None and (params.logprobs is not None or len(resume) > params.n):
            raise ValueError("resume takes at most n token lists, and no request with logprobs (they are not kept)")
        prompt_ids = self._prompt_ids(prompt)
        if resume is not None:
            self._prompt_ids([t for tokens in resume for t in tokens] or [0])  # token ids within the vocabulary
        max_tokens = self.max_model_len - len(prompt_ids)
        if params.max_tokens is not None:
            max_tokens = min(max_tokens, params.max_tokens)
        arrival = next(self._arrivals)
        choices = []
        for index in range(params.n):
            generator = None
            if params.seed is not None:
                generator = torch.Generator(self.device).manual_seed(params.seed + index)
            detokenizer = None
            if self.tokenizer is not None:
                detokenizer = IncrementalDetokenizer(self.tokenizer, prompt_ids, params.stop, params.skip_special_tokens)
            choices.append(Request(f"{request_id}/{index}", prompt_ids, params, max_tokens, arrival, priority,
                                   self.eos_token_ids, generator, detokenizer))
        spec = params.structured_outputs
        compiling = self._structured_outputs().compile(spec) if spec is not None else None
        group = _Group(request_id, prompt_ids, choices, [0] * params.n, [""] * params.n, stream, checkpoint_every)
        self._groups[request_id] = group
        for request, tokens in zip(choices, resume or ()):
            self._resume(request, tokens)
        if group.finished:  # the earlier run had generated its last token, but its end was never delivered
            del self._groups[request_id]
            self._pending.append(self._output(group))
            return
        if compiling is not None:
            self._compiling.append((compiling, choices))
            return
        for request in choices:
            if not request.status.finished:
                self.scheduler.add(request)

    def _resume(self, request: Request, tokens: list[int]) -> None:
        """Take `tokens` as the request's first outputs, before it is scheduled: its first step prefills the prompt
        and them (a cached prefix included), the stop checks and the detokenizer see them as if generated here,
        and a seeded generator is moved past the draws they took (the sampler draws `vocab` values per token of a
        seeded row), so that greedy and seeded sampling continue as an uninterrupted run would. A grammar takes
        them once it is compiled (_admit_compiled). A token that ends the request ends it here."""
        draws = request.generator is not None and not request.params.greedy
        for token in tokens:
            request.append_token(token)
            if draws:
                torch.empty(self.vocab_size, dtype=torch.float32, device=self.device).exponential_(
                    generator=request.generator)
            status = request.stop_by_token()
            if request.detokenizer is not None:
                stop = request.detokenizer.add_tokens([token])
                if stop is not None:
                    request.stop_reason, status = stop, RequestStatus.FINISHED_STOPPED
            if status is not None:
                request.status = status
                return

    def abort_request(self, request_id: str) -> bool:
        """Stop a request wherever it is; its KV blocks are free at once. False if it is unknown or already done."""
        group = self._groups.pop(request_id, None)
        if group is None:
            return False
        for request in group.choices:
            self.scheduler.finish(request, RequestStatus.FINISHED_ABORTED)
        self._pending.append(self._output(group))
        return True

    def stream_request(self, request_id: str) -> bool:
        """From the next step on, an output after every step for a request added with `stream=False` (its next
        delta carries everything since its last output). False if it is unknown or already done."""
        group = self._groups.get(request_id)
        if group is None:
            return False
        group.stream = True
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self._groups or self._pending or self._ahead)

    # ---- one engine step ----

    def step(self) -> list[RequestOutput]:
        """Run one step; the outputs of the requests it advanced (and of aborts since the last step).

        With async scheduling, a step queues the next step on the device before reading its own tokens, which then
        feed the next step's decodes on the device (prompt chunks and admitted requests take their known tokens):
        the host's work of one step (reading tokens, stop checks, outputs, scheduling, input preparation) overlaps
        the device's work on the next, instead of leaving the device idle. The next call finishes that step.
        Where a row's sampling reads the tokens on the host (a grammar's state, penalty counts), only the forward
        pass is queued ahead, and the sampling once this step's tokens are accepted: the device runs that forward
        pass meanwhile. Greedy outputs are the same either way."""
        if self._compiling:
            self._admit_compiled()
        outputs, self._pending = self._pending, []
        launched, self._ahead = self._ahead, None
        if launched is None:
            scheduled = self.scheduler.schedule()
            if not scheduled.chunks:
                self.last_step_batch_size = 0
                return outputs
            launched = self._forward(scheduled, self.runner.order(scheduled))
            self._sample(launched)
        ahead = deferred = None
        if self.async_scheduling and launched.pending is not None:
            scheduled_ahead = self.scheduler.schedule_ahead(launched.chunks)
            if scheduled_ahead is not None:
                scheduled, rows = scheduled_ahead
                tokens = launched.pending.token_ids  # one per sampled row: the inputs of the first chunks
                if rows != list(range(len(launched.sampling))):
                    tokens = tokens[torch.tensor(rows, device=tokens.device)]
                ahead = self._forward(scheduled, scheduled.chunks, tokens)
                if any(self._samples_after_host(r) for r in ahead.sampling):
                    deferred = ahead
                else:
                    self._sample(ahead)
        outputs += self._finish(launched)
        if deferred is not None:
            self._sample(deferred)
        self._ahead = ahead
        return outputs

    @staticmethod
    def _samples_after_host(request: Request) -> bool:
        return request.grammar is not None or uses_penalties(request.params)

    def _forward(self, scheduled: SchedulerOutput, chunks: list[ScheduledChunk],
                 input_ids: torch.Tensor | None = None) -> _LaunchedStep:
        """Queue a step's forward pass on the device (chunks in the runner's order)."""
        self.last_step_batch_size = len(chunks)
        prompt_logprobs: list = []
        logits = self.runner.execute(chunks, input_ids, prompt_logprobs)
        return _LaunchedStep(scheduled, chunks, [c.request for c in chunks if c.sample], logits, prompt_logprobs)

    def _sample(self, step: _LaunchedStep) -> None:
        """Queue a step's sampling on the device, from its requests' state on the host as it is now."""
        sampling = step.sampling
        if not sampling:
            return
        if self._structured is not None:  # a request that has ended since its step was queued needs no mask
            self._structured.apply(step.logits, [None if r.status.finished else r.grammar for r in sampling])
        rows = [SamplingRow(r.params, r.prompt_token_ids, r.output_token_ids, r.generator, r.suppressed_token_ids())
                for r in sampling]
        step.pending = self.sampler.launch(step.logits, rows)

    def _finish(self, launched: _LaunchedStep) -> list[RequestOutput]:
        """Read a launched step's tokens, mark its KV computed, accept the tokens; the outputs to send."""
        sampled = launched.pending.finish() if launched.pending is not None else []
        self.scheduler.update(launched.scheduled)
        for chunk, logprobs in launched.prompt_logprobs:
            self._score_prompt(chunk, logprobs)
        outputs = []
        advanced: dict[str, _Group] = {}
        for request, token in zip(launched.sampling, sampled):
            if request.status.finished:
                continue  # ended while this step was queued (aborted, or stopped by the token before): dropped
            self._accept(request, token)
            group_id = request.request_id.rpartition("/")[0]
            advanced[group_id] = self._groups[group_id]
        for group_id, group in advanced.items():
            finished = group.finished
            if group.wants_output():
                outputs.append(self._output(group))
            if finished:
                del self._groups[group_id]
        return outputs

    @staticmethod
    def _score_prompt(chunk: ScheduledChunk, logprobs: torch.Tensor) -> None:
        """Record the log-probs of the prompt tokens a chunk's rows predict (row j: token start + j + 1), and the
        top alternatives. Rows already recorded (a chunk computed again after a preemption) are skipped."""
        request = chunk.request
        recorded = request.prompt_logprobs
        first = len(recorded) - chunk.start - 1  # the first row not recorded yet
        rows = min(chunk.num_tokens, len(request.prompt_token_ids) - chunk.start - 1)  # the last predicts output
        if recorded is None or request.status.finished or first >= rows:
            return
        targets = torch.tensor(request.prompt_token_ids[chunk.start + first + 1:chunk.start + rows + 1],
                               device=logprobs.device)
        logprobs = logprobs[first:rows]
        own = logprobs.gather(1, targets[:, None])[:, 0].tolist()
        top = request.params.prompt_logprobs
        top_values, top_ids = logprobs.topk(top, dim=-1) if top else (None, None)
        for i, (token, value) in enumerate(zip(targets.tolist(), own)):
            entry = dict(zip(top_ids[i].tolist(), top_values[i].tolist())) if top else {}
            entry[token] = value
            recorded.append(entry)

    def _accept(self, request: Request, token) -> None:
        request.append_token(token.token_id)
        if request.logprobs is not None:
            entry = dict(token.top_logprobs or {})
            entry[token.token_id] = token.logprob
            request.logprobs.append(entry)
        status = request.stop_by_token()
        if request.grammar is not None:
            # A grammar that has ended (its stop token accepted) allows nothing more, even with ignore_eos. It ends
            # only by accepting a stop token (EOS), so only then is it asked.
            if not request.grammar.accept_token(token.token_id):
                log.error("request %s: token %d is outside its grammar", request.request_id, token.token_id)
                status = status or RequestStatus.FINISHED_ABORTED
            elif token.token_id in self.eos_token_ids and request.grammar.is_terminated():
                status = status or RequestStatus.FINISHED_STOPPED
        if request.detokenizer is not None:
            stop = request.detokenizer.add_tokens([token.token_id])
            if stop is not None:
                request.stop_reason = stop
                status = RequestStatus.FINISHED_STOPPED
        if status is not None:
            self.scheduler.finish(request, status)

    def _output(self, group: _Group) -> RequestOutput:
        completions = []
        for index, request in enumerate(group.choices):
            finished = request.status.finished
            delta = request.detokenizer.take_delta(finished) if request.detokenizer is not None else ""
            group.sent_text[index] += delta
            sent = group.sent_tokens[index]
            group.sent_tokens[index] = request.num_output_tokens
            # Copies only once finished: copying every step would cost O(length) per token (see CompletionOutput).
            tokens, logprobs = request.output_token_ids, request.logprobs
            completions.append(CompletionOutput(
                index=index, text=group.sent_text[index], token_ids=list(tokens) if finished else tokens,
                delta_text=delta, delta_token_ids=tokens[sent:],
                finish_reason=request.status.finish_reason, stop_reason=request.stop_reason,
                logprobs=list(logprobs) if finished and logprobs is not None else logprobs))
        first = group.choices[0]  # the prompt is every choice's: its facts are the first choice's
        prompt_logprobs = list(first.prompt_logprobs) if group.finished and first.prompt_logprobs is not None \
            else None
        return RequestOutput(group.request_id, group.prompt_token_ids, completions, group.finished,
                             sum(r.num_preemptions for r in group.choices), first.num_cached_tokens, prompt_logprobs)

    @torch.inference_mode()
    def prompt_logits(self, prompt: str | list[int]) -> torch.Tensor:
        """The logits of the token after `prompt` ([vocab], float32), from one prefill outside any batch: what
        accuracy checks compare across weight formats of one checkpoint. Only on an idle engine."""
        if self.has_unfinished_requests():
            raise RuntimeError("prompt_logits needs an idle engine")
        ids = self._prompt_ids(prompt)
        request = Request("inferq-prompt-logits", ids, SamplingParams(max_tokens=1), max_tokens=1, arrival=-1)
        block_manager = self.scheduler.block_manager
        if not block_manager.allocate(request.block_ids, len(ids)):
            raise ValueError(f"a prompt of {len(ids)} tokens does not fit the free KV cache")
        try:
            return self.runner.execute([ScheduledChunk(request, 0, len(ids), sample=True)])[0]
        finally:
            block_manager.free(request.block_ids)

    # ---- structured outputs ----

    def _structured_outputs(self) -> StructuredOutputs:
        if self._structured is None:
            if self.tokenizer is None:
                raise ValueError("structured outputs need the model's tokenizer (this engine has none)")
            from engine.structured_output import StructuredOutputs  # xgrammar, only once a request needs it

            self._structured = StructuredOutputs(self.tokenizer, self.vocab_size, sorted(self.eos_token_ids),
                                                 self.config.max_num_seqs)
        return self._structured

    def _admit_compiled(self) -> None:
        """Move requests whose grammar is ready into the scheduler; a failed grammar aborts its request. With
        nothing else to run, wait a little for a grammar rather than spin."""
        if not (self.scheduler.running or self.scheduler.waiting or self._ahead or self._pending):
            futures.wait([f for f, _ in self._compiling], timeout=0.005, return_when=futures.FIRST_COMPLETED)
        still = []
        for future, choices in self._compiling:
            if not future.done():
                still.append((future, choices))
                continue
            group_id = choices[0].request_id.rpartition("/")[0]
            if future.exception() is not None:
                log.error("request %s: its grammar did not compile: %s", group_id, future.exception())
                self.abort_request(group_id)
                continue
            for request in choices:
                if not request.status.finished:  # not aborted (nor ended by its resumed tokens) meanwhile
                    request.grammar = self._structured.matcher(future)
                    if not all(request.grammar.accept_token(t) for t in request.output_token_ids):  # resumed
                        log.error("request %s: its resumed tokens are outside its grammar", request.request_id)
                        self.abort_request(group_id)
                        break
                    self.scheduler.add(request)
        self._compiling = still

    # ---- helpers ----

    def _warm_up(self) -> None:
        """One short request through every step kind, so that kernels compile now rather than during the first
        requests (a Triton kernel's first launch takes ~0.5 s)."""
        request_id = "inferq-warm-up"
        self.add_request(request_id, [0] * min(32, self.max_model_len - 3),
                         SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True))
        while self.has_unfinished_requests():
            self.step()

    def _prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this engine has no tokenizer: pass the prompt as token ids")
            ids = self.tokenizer.encode(prompt) if prompt else []
        else:
            ids = list(prompt)
            if any(not isinstance(t, int) or not 0 <= t < self.vocab_size for t in ids):
                raise ValueError(f"prompt token ids must be integers in [0, {self.vocab_size})")
        if not ids:
            raise ValueError("prompt must not be empty")
        if len(ids) >= self.max_model_len:
            raise ValueError(f"prompt is {len(ids)} tokens long, but max_model_len is {self.max_model_len}: "
                             "it must be shorter, to leave room for at least one generated token")
        return ids

    def _max_model_len(self, cache_tokens: int) -> int:
        """The configured limit, else the checkpoint's, capped by what the KV cache can hold for one request."""
        model_limit = int(getattr(self.hf_config, "max_position_embeddings", 0) or 2048)
        wanted = self.config.max_model_len
        if wanted is not None and wanted > model_limit:
            raise ValueError(f"max_model_len {wanted} exceeds the model's max_position_embeddings {model_limit}")
        if wanted is not None and wanted > cache_tokens:
            raise ValueError(f"max_model_len {wanted} does not fit the KV cache ({cache_tokens} tokens): "
                             "give the cache more memory or lower max_model_len")
        if wanted is None and model_limit > cache_tokens:
            log.warning("KV cache holds %d tokens, fewer than the model's context %d: capping max_model_len",
                        cache_tokens, model_limit)
        return wanted or min(model_limit, cache_tokens)

    def _activation_reserve(self) -> int:
        """Bytes to leave free on an accelerator for one step's activations and logits (a conservative estimate)."""
        c, cfg = self.config, self.hf_config
        element = torch.empty((), dtype=self.dtype).element_size()
        per_token = (4 * cfg.hidden_size + 3 * cfg.intermediate_size) * element
        logits = c.max_num_seqs * cfg.vocab_size * 4 * 3
        return c.max_num_batched_tokens * per_token * 2 + logits + (256 << 20)

    def stats(self) -> dict[str, int]:
        block_manager = self.scheduler.block_manager
        return {"num_running": len(self.scheduler.running), "num_waiting": len(self.scheduler.waiting),
                "num_kv_blocks": block_manager.num_blocks, "num_free_kv_blocks": block_manager.num_free_blocks,
                "num_cached_kv_blocks": block_manager.num_cached_blocks,
                "prefix_cache_queries": self.scheduler.prefix_queried_tokens,
                "prefix_cache_hits": self.scheduler.prefix_hit_tokens}


def _agree_num_blocks(tp: TensorParallel, own: int) -> int:
    """Every rank's KV cache holds the same blocks: the fewest any rank's budget allows (the followers report
    theirs, engine/tp_follower.py). ValueError where a follower has no room at all."""
    reports = tp.gather(own)
    for rank, report in enumerate(reports):
        if isinstance(report, str):
            raise ValueError(f"tensor-parallel rank {rank}: {report}")
    return min(reports)


def _checkpoint_dtype(hf_config) -> str | None:
    dtype = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    return str(dtype) if dtype is not None else None
