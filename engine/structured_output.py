"""Grammar-constrained decoding (structured outputs) with xgrammar.

A request whose SamplingParams carry `structured_outputs` (a JSON schema, any JSON object, a regex, a choice of
strings, an EBNF grammar, or an xgrammar structural tag for tool calls) samples only tokens its grammar allows:
  - its grammar is compiled against the tokenizer's vocabulary on a thread pool, off the engine loop; the request
    waits outside the scheduler until its grammar is ready (`StructuredOutputs.ready`). Compiled grammars are
    cached by their spec, so a batch of requests with one schema compiles it once;
  - each of its n choices gets its own matcher (the grammar's state), fed every token the engine accepts for it;
  - at each step the matchers of the sampling rows fill one token bitmask on the host (on xgrammar's threads),
    which is copied to the logits' device and applied there before the sampler sees the logits (masked tokens get
    -inf, as in vLLM, so log-probs of the raw output count only allowed tokens).
No rollback is ever needed: preemption recomputes a request's KV and keeps its tokens, and a token reaches the
matcher only when the engine accepts it. A step queued ahead (async scheduling) runs its forward pass before the
previous step's tokens are read, but its constrained rows are sampled only once the matchers have accepted them
(engine.step), so the mask is always that of the request's true state.

`grammar_for` turns a spec into xgrammar's grammar without the vocabulary: the worker calls it in its task thread to
refuse a bad schema, regex or grammar as the caller's error before the request reaches the engine.
"""
from __future__ import annotations

import json
import logging
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor

import torch
import xgrammar as xgr

from engine.sampling_params import StructuredOutputsParams

log = logging.getLogger(__name__)

_COMPILE_THREADS = 2  # grammars compile in C++ threads of their own; two keep one slow schema from blocking others
_CACHED_GRAMMARS = 256


def grammar_for(spec: StructuredOutputsParams) -> xgr.Grammar:
    """xgrammar's grammar of a spec; ValueError naming the problem (an unsupported schema, a bad regex...)."""
    try:
        if spec.json is not None:
            schema = spec.json if isinstance(spec.json, str) else json.dumps(spec.json)
            return _json_strings_without_control_characters(
                xgr.Grammar.from_json_schema(schema, any_whitespace=not spec.disable_any_whitespace))
        if spec.json_object:
            return xgr.Grammar.builtin_json_grammar()
        if spec.regex is not None:
            return xgr.Grammar.from_regex(spec.regex)
        if spec.choice is not None:
            # One alternative per choice, each a JSON-escaped EBNF string literal (EBNF strings escape as JSON's).
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c) for c in spec.choice))
        if spec.grammar is not None:
            return xgr.Grammar.from_ebnf(spec.grammar)
        return xgr.Grammar.from_structural_tag(spec.structural_tag)
    except (RuntimeError, ValueError, TypeError) as exc:  # xgrammar reports parse errors as RuntimeError
        raise ValueError(f"structured output: {spec.kind} is not usable: {_first_line(exc)}") from None


# xgrammar 0.2.9 writes the characters of a string with minLength/maxLength as [^"\\\r\n], which lets raw control
# characters (U+0000-U+001F) through, and JSON forbids them unescaped: such a string would not parse (seen with
# random weights: "\x12" inside a maxLength string). Its plain strings already exclude them.
_LAX_STRING_CHAR = r'[^\"\\\r\n]'
_JSON_STRING_CHAR = r'[^\"\\\0-\x1f]'


def _json_strings_without_control_characters(grammar: xgr.Grammar) -> xgr.Grammar:
    text = str(grammar)
    return xgr.Grammar.from_ebnf(text.replace(_LAX_STRING_CHAR, _JSON_STRING_CHAR)) if _LAX_STRING_CHAR in text \
        else grammar


def _first_line(exc: BaseException) -> str:
    """xgrammar's message without its C++ source location ("[12:00:00] /project/cpp/x.cc:94: ...")."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    head, sep, rest = text.partition(": ")
    return rest if sep and head.startswith("[") else text


class StructuredOutputs:
    """One engine's grammar compiler, compile pool, grammar cache and bitmask buffer."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int], max_rows: int) -> None:
        info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
        self.vocab_size = vocab_size
        # Its own cache off: ours below is bounded (xgrammar's is unbounded by default) and keyed by the spec.
        self._compiler = xgr.GrammarCompiler(info, max_threads=_COMPILE_THREADS, cache_enabled=False)
        self._pool = ThreadPoolExecutor(_COMPILE_THREADS, thread_name_prefix="inferq-grammar")
        # spec key -> Future[CompiledGrammar], the most recently used last: a worker that serves many different
        # schemas keeps the newest _CACHED_GRAMMARS compiled (a grammar's token masks take up to a few MB).
        self._compiled: OrderedDict[tuple[str, str], Future] = OrderedDict()
        self._bitmask = xgr.allocate_token_bitmask(max_rows, vocab_size)  # int32 [rows, ceil(vocab / 32)], host
        self._batch = xgr.BatchGrammarMatcher()  # fills the rows of one step on xgrammar's threads

    def compile(self, spec: StructuredOutputsParams) -> Future:
        """The compiled grammar of `spec`, compiling it on the pool the first time it is asked for."""
        key = spec.key()
        future = self._compiled.get(key)
        if future is None:
            future = self._compiled[key] = self._pool.submit(
                lambda: self._compiler.compile_grammar(grammar_for(spec)))
            if len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)  # requests holding its matchers keep what they need
        else:
            self._compiled.move_to_end(key)
        return future

    def matcher(self, future: Future) -> xgr.GrammarMatcher:
        """A fresh matcher (the grammar's start state) of a compiled grammar; its error if compiling failed."""
        return xgr.GrammarMatcher(future.result())

    def apply(self, logits: torch.Tensor, matchers: list[xgr.GrammarMatcher | None]) -> None:
        """Mask, in place, the tokens each row's grammar does not allow next; rows without a matcher are untouched."""
        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = self._bitmask
        if len(matchers) > bitmask.shape[0]:
            bitmask = self._bitmask = xgr.allocate_token_bitmask(len(matchers), self.vocab_size)
        self._batch.batch_fill_next_token_bitmask([matchers[i] for i in rows], bitmask, rows)
        # From pageable memory the copy is staged before it returns: the buffer is free for the next step's fill.
        device_mask = bitmask[:len(matchers)].to(logits.device, non_blocking=True)
        xgr.apply_token_bitmask_inplace(logits, device_mask, vocab_size=self.vocab_size, indices=rows)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
