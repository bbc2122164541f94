"""Offline batch inference: LLM(model=DIR).generate(prompts, SamplingParams(...)), as in vLLM."""
from __future__ import annotations

import itertools
from collections.abc import Sequence

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.outputs import RequestOutput
from engine.sampling_params import SamplingParams

Prompt = str | list[int]


class LLM:
    def __init__(self, model: str, **engine_options) -> None:
        self.engine = LLMEngine(EngineConfig(model=model, **engine_options))
        self._ids = itertools.count()

    @property
    def tokenizer(self):
        return self.engine.tokenizer

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 priority: Sequence[int] | None = None) -> list[RequestOutput]:
        """Run every prompt to completion, batched together; outputs in the order of the prompts.

        A prompt is text or a list of token ids. One SamplingParams applies to all, or give one per prompt.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]  # a single prompt
        params = sampling_params or SamplingParams()
        params_list = [params] * len(prompts) if isinstance(params, SamplingParams) else list(params)
        if len(params_list) != len(prompts):
            raise ValueError(f"got {len(prompts)} prompts but {len(params_list)} sampling params")
        priorities = list(priority) if priority is not None else [0] * len(prompts)
        request_ids = [str(next(self._ids)) for _ in prompts]
        try:
            for request_id, prompt, p, prio in zip(request_ids, prompts, params_list, priorities):
                self.engine.add_request(request_id, prompt, p, prio, stream=False)
        except ValueError:
            for request_id in request_ids:
                self.engine.abort_request(request_id)
            self.engine.step()  # drain the abort outputs
            raise
        finished: dict[str, RequestOutput] = {}
        while self.engine.has_unfinished_requests():
            for output in self.engine.step():
                if output.finished:
                    finished[output.request_id] = output
        return [finished[request_id] for request_id in request_ids]
