"""Structured outputs and tool calls through the whole service (real Redis, worker, API) with a real chat model
(SmolLM2-135M-Instruct), driven by the official `openai` client as users drive it."""
from __future__ import annotations

import json
import re
import time
from typing import Annotated, Literal

import jsonschema
import openai
import pytest
from pydantic import BaseModel, Field

from tests.service import API_KEYS, MODEL, Service, running
from tests.smollm2 import smollm2_checkpoint


class City(BaseModel):
    # Bounded, so that every output ends inside max_tokens even when sampling wanders (a 135M model at
    # temperature 1 can write one string for hundreds of tokens): then every output can be checked whole.
    name: Annotated[str, Field(max_length=40)]
    country: Annotated[str, Field(max_length=40)]
    population_millions: Annotated[int, Field(ge=0, le=100)]
    continent: Literal["Africa", "Asia", "Europe", "North America", "Oceania", "South America"]


@pytest.fixture(scope="module")
def service(redis_url, tmp_path_factory):
    with running(Service(redis_url, smollm2_checkpoint(), tmp_path_factory.mktemp("structured-logs"))) as svc:
        svc.start_webhook_worker()  # batch expansion and bookkeeping
        yield svc


@pytest.fixture(scope="module")
def oai(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=0, timeout=120)


def test_parse_with_a_pydantic_model(oai):
    completion = oai.chat.completions.parse(
        model=MODEL, response_format=City, temperature=0, max_completion_tokens=120,
        messages=[{"role": "user", "content": "Describe Paris as JSON: name, country, population in millions, "
                                              "continent."}])
    choice = completion.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    assert isinstance(choice.message.parsed, City)
    assert choice.message.parsed.continent == "Europe"  # what the model knows, spelled as the schema allows


@pytest.mark.parametrize("seed", range(6))
def test_sampled_json_matches_its_schema(oai, seed):
    schema = City.model_json_schema()
    completion = oai.chat.completions.create(
        model=MODEL, temperature=1.0, seed=seed, max_completion_tokens=200,
        response_format={"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}},
        messages=[{"role": "user", "content": "Give me a city as JSON."}])
    assert completion.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(completion.choices[0].message.content), schema)


def test_the_stream_helper_parses_the_streamed_json(oai):
    with oai.chat.completions.stream(model=MODEL, response_format=City, temperature=0, max_completion_tokens=120,
                                     messages=[{"role": "user", "content": "Describe Rome as JSON."}]) as stream:
        for _ in stream:
            pass
        final = stream.get_final_completion()
    assert isinstance(final.choices[0].message.parsed, City)


def test_batch_lines_with_a_schema(oai):
    schema = City.model_json_schema()
    lines = [{"custom_id": f"c{i}", "method": "POST", "url": "/v1/chat/completions",
              "body": {"model": MODEL, "temperature": 1.0, "seed": i, "max_completion_tokens": 200,
                       "messages": [{"role": "user", "content": f"City number {i} as JSON."}],
                       "response_format": {"type": "json_schema",
                                           "json_schema": {"name": "city", "schema": schema, "strict": True}}}}
             for i in range(4)]
    upload = oai.files.create(file=("lines.jsonl", "".join(json.dumps(line) + "\n" for line in lines).encode()),
                              purpose="batch")
    batch = oai.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions", completion_window="24h")
    for _ in range(600):
        batch = oai.batches.retrieve(batch.id)
        if batch.status in ("completed", "failed", "cancelled", "expired"):
            break
        time.sleep(0.2)
    assert batch.status == "completed" and batch.request_counts.completed == 4, batch
    for raw in oai.files.content(batch.output_file_id).text.splitlines():
        body = json.loads(raw)["response"]["body"]
        jsonschema.validate(json.loads(body["choices"][0]["message"]["content"]), schema)


def test_json_object_and_vllm_constraints_on_completions(oai):
    obj = oai.chat.completions.create(model=MODEL, temperature=0, max_completion_tokens=80,
                                      response_format={"type": "json_object"},
                                      messages=[{"role": "user", "content": 'Repeat this JSON object and nothing '
                                                                            'else: {"colour": "blue"}'}])
    assert obj.choices[0].finish_reason == "stop", obj.choices[0].message.content
    assert isinstance(json.loads(obj.choices[0].message.content), dict)
    choice = oai.completions.create(model=MODEL, prompt="The sky is", max_tokens=8, temperature=0,
                                    extra_body={"guided_choice": ["blue", "green"]})
    assert choice.choices[0].text in ("blue", "green")
    regex = oai.completions.create(model=MODEL, prompt="A date:", max_tokens=16, temperature=0,
                                   extra_body={"structured_outputs": {"regex": r"20[0-9]{2}-[01][0-9]-[0-3][0-9]"}})
    assert re.fullmatch(r"20[0-9]{2}-[01][0-9]-[0-3][0-9]", regex.choices[0].text)


def test_a_bad_schema_is_the_callers_400(oai):
    with pytest.raises(openai.BadRequestError) as caught:
        oai.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}],
                                    response_format={"type": "json_schema",
                                                     "json_schema": {"name": "x", "schema": {"type": "bogus"}}})
    assert "not usable" in caught.value.body["message"]
    with pytest.raises(openai.BadRequestError) as caught:
        oai.completions.create(model=MODEL, prompt="x", extra_body={"guided_regex": "a", "guided_choice": ["b"]})
    assert "at most one" in caught.value.body["message"]


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 40}},
                   "required": ["city"], "additionalProperties": False}}}
ASK = [{"role": "user", "content": "What is the weather like in Paris right now?"}]


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_a_required_or_named_tool_call_is_parsed(oai, tool_choice):
    # One call: a 135M model that was never taught tools would go on calling while parallel calls are allowed.
    completion = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice=tool_choice,
                                             parallel_tool_calls=False, temperature=0, max_completion_tokens=80)
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls", choice.message
    [call] = choice.message.tool_calls[:1]
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    assert "paris" in json.loads(call.function.arguments)["city"].lower()


def test_tool_calls_stream_as_tool_call_deltas(oai):
    stream = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                         parallel_tool_calls=False, temperature=0, max_completion_tokens=80,
                                         stream=True)
    calls: dict[int, dict] = {}
    reasons, content = [], ""
    for chunk in stream:
        for choice in chunk.choices:
            content += choice.delta.content or ""
            for call in choice.delta.tool_calls or ():
                entry = calls.setdefault(call.index, {"name": "", "arguments": "", "id": None})
                entry["id"] = entry["id"] or call.id
                entry["name"] += call.function.name or ""
                entry["arguments"] += call.function.arguments or ""
            if choice.finish_reason:
                reasons.append(choice.finish_reason)
    assert reasons == ["tool_calls"] and calls[0]["name"] == "get_weather" and calls[0]["id"]
    assert "paris" in json.loads(calls[0]["arguments"])["city"].lower()
    assert "<tool_call>" not in content


def test_a_tool_round_trip(oai):
    first = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="required",
                                        parallel_tool_calls=False, temperature=0,
                                        max_completion_tokens=80).choices[0].message
    call = first.tool_calls[0]
    conversation = ASK + [first.model_dump(exclude_none=True),
                          {"role": "tool", "tool_call_id": call.id, "content": '{"temperature_c": 21, "sky": "clear"}'}]
    answer = oai.chat.completions.create(model=MODEL, messages=conversation, tools=[WEATHER], tool_choice="none",
                                         temperature=0, max_completion_tokens=40)
    assert answer.choices[0].message.content and not answer.choices[0].message.tool_calls


def test_auto_gives_text_or_well_formed_calls(oai):
    choice = oai.chat.completions.create(model=MODEL, messages=ASK, tools=[WEATHER], tool_choice="auto",
                                         temperature=0, max_completion_tokens=80).choices[0]
    for call in choice.message.tool_calls or ():
        assert call.function.name == "get_weather" and json.loads(call.function.arguments)
    assert choice.message.tool_calls or choice.message.content


@pytest.mark.parametrize("fields, param", [
    (dict(tool_choice={"type": "function", "function": {"name": "nope"}}, tools=[WEATHER]), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[WEATHER], tool_choice="required", response_format={"type": "json_object"}), None),
    (dict(messages=[{"role": "tool", "content": "x"}]), "messages.0"),
])
def test_tool_misuse_is_a_400(service, fields, param):
    with service.client() as client:
        r = client.post("/v1/chat/completions", json={"model": MODEL, "messages": ASK} | fields)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param
