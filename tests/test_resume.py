"""A request resumed from the tokens an earlier run generated (LLMEngine.add_request's `resume`) continues as that
run would have: greedy and seeded outputs equal an uninterrupted run's, token for token and in text, stop checks
and grammars see the resumed tokens, and a request whose resumed tokens already end it ends at once."""
from __future__ import annotations

import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from tests.test_engine import GREEDY, assert_all_blocks_free, drain, engine_for, tiny  # noqa: F401 (fixture)

PROMPTS = {"a": [5, 6, 7, 8, 9, 10, 11], "b": [20, 21, 22], "c": list(range(30, 70))}


def uninterrupted(engine: LLMEngine, params: SamplingParams, prompts=PROMPTS) -> dict:
    for request_id, prompt in prompts.items():
        engine.add_request(request_id, prompt, params)
    return drain(engine)


@pytest.mark.parametrize("options", [dict(), dict(max_num_batched_tokens=16), dict(num_kv_blocks=10, max_num_seqs=3),
                                     dict(enable_prefix_caching=False)],
                         ids=["default", "chunked-prefill", "preemption", "no-prefix-caching"])
@pytest.mark.parametrize("params", [SamplingParams(max_tokens=24, **GREEDY),
                                    SamplingParams(max_tokens=24, temperature=1.0, top_p=0.9, seed=7, n=2,
                                                   ignore_eos=True)],
                         ids=["greedy", "seeded-n2"])
def test_resumed_requests_continue_as_an_uninterrupted_run(tiny, options, params):
    directory, _ = tiny
    engine = engine_for(directory, **options)
    full = uninterrupted(engine, params)
    for cut in (1, 9, 23):
        for request_id, prompt in PROMPTS.items():
            done = [list(c.token_ids[:cut]) for c in full[request_id].outputs]
            engine.add_request(f"{request_id}-{cut}", prompt, params, resume=done)
        resumed = drain(engine)
        for request_id in PROMPTS:
            got = [c.token_ids for c in resumed[f"{request_id}-{cut}"].outputs]
            assert got == [c.token_ids for c in full[request_id].outputs], (request_id, cut)
            assert [c.finish_reason for c in resumed[f"{request_id}-{cut}"].outputs] == ["length"] * params.n
    assert_all_blocks_free(engine)


def test_resumed_text_stop_strings_and_the_first_output(demo_model_dir):
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), device="cpu", dtype="float32", num_kv_blocks=64))
    params = SamplingParams(max_tokens=40, **GREEDY)
    full = uninterrupted(engine, params, {"p": "Once upon a time"})["p"].outputs[0]
    # Resumed mid-way, streamed: the first output carries the resumed tokens and their text, the rest follows.
    engine.add_request("r", "Once upon a time", params, resume=[full.token_ids[:15]])
    outputs = []
    while engine.has_unfinished_requests():
        outputs += [o.outputs[0] for o in engine.step()]
    assert outputs[0].delta_token_ids[:15] == full.token_ids[:15]
    assert "".join(o.delta_text for o in outputs) == outputs[-1].text == full.text
    # A stop string that the resumed tokens' text already holds ends the request at once, with that reason.
    stop = full.text[len(full.text) // 2:][:4]
    stopped = uninterrupted(engine, SamplingParams(max_tokens=40, stop=[stop], **GREEDY), {"s": "Once upon a time"})
    stopped = stopped["s"].outputs[0]
    engine.add_request("again", "Once upon a time", SamplingParams(max_tokens=40, stop=[stop], **GREEDY),
                       resume=[stopped.token_ids])
    again = engine.step()
    assert [(o.request_id, o.finished) for o in again] == [("again", True)]
    assert (again[0].outputs[0].text, again[0].outputs[0].finish_reason, again[0].outputs[0].stop_reason) == \
        (stopped.text, "stop", stop)
    # All of max_tokens resumed: it ends at once, as "length".
    engine.add_request("all", "Once upon a time", params, resume=[full.token_ids])
    assert [(o.outputs[0].token_ids, o.outputs[0].finish_reason) for o in engine.step()] == \
        [(full.token_ids, "length")]
    assert not engine.has_unfinished_requests()
    assert_all_blocks_free(engine)


def test_a_resumed_grammar_continues_from_its_tokens(demo_model_dir):
    engine = LLMEngine(EngineConfig(model=str(demo_model_dir), device="cpu", dtype="float32", num_kv_blocks=64))
    schema = {"type": "object", "properties": {"a": {"type": "string"}}, "required": ["a"]}
    params = SamplingParams(max_tokens=30, temperature=0.0,
                            structured_outputs=StructuredOutputsParams(json=schema))
    full = uninterrupted(engine, params, {"j": "JSON:"})["j"].outputs[0]
    engine.add_request("r", "JSON:", params, resume=[full.token_ids[:5]])
    resumed = drain(engine)["r"].outputs[0]
    assert (resumed.token_ids, resumed.text) == (full.token_ids, full.text)


def test_checkpoint_outputs_of_a_request_that_does_not_stream(tiny):
    engine = engine_for(tiny[0])
    engine.add_request("q", [5, 6, 7], SamplingParams(max_tokens=20, **GREEDY), stream=False, checkpoint_every=8)
    counts = []
    while engine.has_unfinished_requests():
        counts += [len(o.outputs[0].token_ids) for o in engine.step()]
    assert counts == [1, 9, 17, 20]  # the first token, every 8 after it, the end


@pytest.mark.parametrize("params,resume,message", [
    (SamplingParams(max_tokens=5, logprobs=2, **GREEDY), [[5]], "logprobs"),
    (SamplingParams(max_tokens=5, **GREEDY), [[5], [6]], "at most n"),
    (SamplingParams(max_tokens=5, **GREEDY), [[5, 10 ** 6]], "token ids must be integers"),
])
def test_bad_resumes_are_rejected_and_leave_nothing_behind(tiny, params, resume, message):
    engine = engine_for(tiny[0])
    with pytest.raises(ValueError, match=message):
        engine.add_request("x", [5, 6, 7], params, resume=resume)
    assert not engine.has_unfinished_requests()
    engine.add_request("x", [5, 6, 7], SamplingParams(max_tokens=3, **GREEDY))  # its id is free again
    assert len(drain(engine)["x"].outputs[0].token_ids) == 3
