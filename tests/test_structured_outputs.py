"""Structured outputs in the engine (xgrammar): every output matches its constraint, under every scheduler setting,
for n > 1 and seeded sampling; a grammar never changes what an unconstrained request in the same batch produces."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from engine.config import EngineConfig
from engine.engine import LLMEngine
from engine.sampling_params import SamplingParams, StructuredOutputsParams
from engine.structured_output import grammar_for
from tests.test_engine import assert_all_blocks_free, count_steps_ahead, drain

# Random weights wander: only languages that end (enums, booleans, bounded numbers and strings, no free
# whitespace) let every output finish inside max_tokens, so that each can be checked whole.
SCHEMAS = [
    {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False},
    {"type": "object", "properties": {"color": {"enum": ["red", "green", "blue"]},
                                      "size": {"type": "integer", "minimum": 0, "maximum": 99}},
     "required": ["color", "size"], "additionalProperties": False},
    {"type": "array", "items": {"type": "boolean"}, "minItems": 1, "maxItems": 3},
    {"type": "object", "properties": {"name": {"type": "string", "maxLength": 6},
                                      "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "maxItems": 2}},
     "required": ["name", "tags"], "additionalProperties": False},
    {"enum": [1, "two", None, True]},
    {"type": "object", "properties": {"inner": {"type": "object", "properties": {"n": {"type": "integer",
                                                                                        "minimum": 1,
                                                                                        "maximum": 5}},
                                                "required": ["n"], "additionalProperties": False}},
     "required": ["inner"], "additionalProperties": False},
]


@pytest.fixture(scope="module")
def engine(demo_model_dir) -> LLMEngine:
    return LLMEngine(EngineConfig(model=str(demo_model_dir), num_kv_blocks=256))


def run(engine: LLMEngine, requests: dict[str, tuple[str, SamplingParams]]) -> dict:
    for request_id, (prompt, params) in requests.items():
        engine.add_request(request_id, prompt, params)
    return drain(engine)


def constrained(max_tokens: int = 64, seed: int | None = None, temperature: float = 1.0, n: int = 1, **spec):
    return SamplingParams(temperature=temperature, seed=seed, n=n, max_tokens=max_tokens,
                          structured_outputs=StructuredOutputsParams(**spec))


def test_every_json_output_validates_against_its_schema_over_many_seeds(engine):
    requests = {f"s{i}-{seed}": ("Answer in JSON:", constrained(seed=seed, json=schema, disable_any_whitespace=True))
                for i, schema in enumerate(SCHEMAS) for seed in range(6)}
    finished = run(engine, requests)
    assert set(finished) == set(requests)
    for request_id, output in finished.items():
        schema = SCHEMAS[int(request_id[1:].split("-")[0])]
        choice = output.outputs[0]
        assert choice.finish_reason == "stop", (request_id, choice.text)
        jsonschema.validate(json.loads(choice.text), schema)


def test_regex_choice_and_grammar(engine):
    finished = run(engine, {
        "regex": ("Code:", constrained(regex=r"[A-C][0-9]{2}-(x|yz)", seed=1)),
        "choice": ("Pick:", constrained(choice=["yes", "no", "maybe later"], seed=2, n=3)),
        "grammar": ("Say:", constrained(grammar='root ::= "(" item ("," item)* ")"\nitem ::= "a" | "bb"', seed=3,
                                        max_tokens=32)),
        "json_object": ("Any JSON object:", constrained(json_object=True, seed=4, max_tokens=400)),
    })
    assert re.fullmatch(r"[A-C][0-9]{2}-(x|yz)", finished["regex"].outputs[0].text)
    assert [c.text in ("yes", "no", "maybe later") for c in finished["choice"].outputs] == [True] * 3
    text = finished["grammar"].outputs[0].text
    assert re.fullmatch(r"\((a|bb)(,(a|bb))*\)?", text) and (text.endswith(")") or
                                                             finished["grammar"].outputs[0].finish_reason == "length")
    obj = finished["json_object"].outputs[0]
    if obj.finish_reason == "stop":  # random weights may write one long string until max_tokens
        assert isinstance(json.loads(obj.text), dict)
    else:
        assert obj.text.startswith("{")


@pytest.mark.parametrize("options", [dict(max_num_seqs=1), dict(max_num_batched_tokens=16),
                                     dict(num_kv_blocks=12, max_num_seqs=8), dict(async_scheduling=True)],
                         ids=["one-at-a-time", "chunked-prefill", "preemption", "async-scheduling"])
def test_scheduler_settings_never_change_a_constrained_output(demo_model_dir, options):
    """Greedy and seeded constrained requests (and one with a penalty) in one batch: the same tokens one at a time,
    with chunked prompts, under preemption, and with async scheduling, whose steps are still queued ahead of
    constrained rows (their sampling waits for the matchers, not their forward pass)."""
    prompts = {f"r{i}": (f"Item {i} as JSON, please, with all details spelled out:", SCHEMAS[i % len(SCHEMAS)])
               for i in range(8)}

    def params(i: int, schema: dict) -> SamplingParams:
        sampled = dict(temperature=1.0, seed=i) if i % 2 else dict(temperature=0.0)
        spec = StructuredOutputsParams(json=schema, disable_any_whitespace=True)
        return SamplingParams(max_tokens=64, repetition_penalty=1.3 if i == 3 else 1.0, structured_outputs=spec,
                              **sampled)

    def outputs(**config) -> tuple[dict[str, list[int]], int, int]:
        engine = LLMEngine(EngineConfig(model=str(demo_model_dir), **({"num_kv_blocks": 256} | config)))
        ahead = count_steps_ahead(engine)
        done = run(engine, {rid: (p, params(i, s)) for i, (rid, (p, s)) in enumerate(prompts.items())})
        assert_all_blocks_free(engine)
        return ({rid: o.outputs[0].token_ids for rid, o in done.items()},
                sum(o.num_preemptions for o in done.values()), ahead[0])

    reference, _, _ = outputs()
    constrained_outputs, preemptions, steps_ahead = outputs(**options)
    assert constrained_outputs == reference
    if "num_kv_blocks" in options:
        assert preemptions > 0  # the setting did what it is named for
    if options.get("async_scheduling"):
        assert steps_ahead >= 5


def test_seeded_sampling_with_n_forks_the_grammar_per_choice(engine):
    spec = dict(json=SCHEMAS[1], disable_any_whitespace=True)
    first = run(engine, {"a": ("Colour:", constrained(seed=7, n=4, **spec))})["a"]
    again = run(engine, {"b": ("Colour:", constrained(seed=7, n=4, **spec))})["b"]
    assert [c.text for c in first.outputs] == [c.text for c in again.outputs]
    for choice in first.outputs:
        jsonschema.validate(json.loads(choice.text), SCHEMAS[1])


def test_a_grammar_leaves_unconstrained_neighbours_alone(engine):
    plain = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    alone = run(engine, {"plain": ("Once upon a time", plain)})["plain"].outputs[0].token_ids
    mixed = run(engine, {"plain": ("Once upon a time", plain),
                         "json": ("Once upon a time", constrained(json=SCHEMAS[0], temperature=0.0))})
    assert mixed["plain"].outputs[0].token_ids == alone
    assert json.loads(mixed["json"].outputs[0].text) in ({"ok": True}, {"ok": False})


def test_abort_while_the_grammar_compiles_and_while_it_runs(engine):
    engine.add_request("early", "x", constrained(regex="[a-z]{1,200}", max_tokens=200))
    assert engine.abort_request("early")
    engine.add_request("late", "x", constrained(regex="[a-z]{1,200}", max_tokens=200))
    for _ in range(3):
        engine.step()
    assert engine.abort_request("late")
    drain(engine)
    assert_all_blocks_free(engine)


@pytest.mark.parametrize("spec, problem", [
    (dict(json={"type": "bogus"}), "json is not usable: Unsupported type"),
    (dict(regex="([a-z"), "regex is not usable"),
    (dict(grammar="root ::= undefined_rule"), "grammar is not usable"),
    (dict(json="{not json"), "json is not usable"),
])
def test_a_bad_constraint_is_the_callers_error(spec, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        grammar_for(StructuredOutputsParams(**spec))


def test_exactly_one_constraint():
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams(json={"type": "object"}, regex="a")
    with pytest.raises(ValueError, match="exactly one"):
        StructuredOutputsParams()
    with pytest.raises(ValueError, match="choice"):
        StructuredOutputsParams(choice=[])


def test_logit_bias_bans_and_forces_tokens(engine):
    plain = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    reference = run(engine, {"r": ("Hello", plain)})["r"].outputs[0].token_ids
    banned = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={reference[0]: -100})
    forced = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logit_bias={42: 100})
    out = run(engine, {"ban": ("Hello", banned), "force": ("Hello", forced)})
    assert reference[0] not in out["ban"].outputs[0].token_ids[:1]
    assert out["force"].outputs[0].token_ids == [42] * 8
    with pytest.raises(ValueError, match="logit_bias"):
        SamplingParams(logit_bias={1: 500})
