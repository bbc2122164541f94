"""The OpenAI-compatible endpoints answer what OpenAI's and vLLM's clients expect, field by field, end to end (real
Redis, worker, webhook worker and API processes, the engine on the demo model): several prompts in one completion,
echo, logit_bias, stream chunks (role first, continuous usage), usage details, fingerprints, decoded logprobs,
model and batch objects, /tokenize and /detokenize, and a 400 naming the field for every OpenAI feature we lack.

Bodies are checked against the `openai` package's own types, strictly: validated with model_validate, and no field
we send may be one the type does not declare (`declared`)."""
from __future__ import annotations

import io
import json
import re
import time

import httpx
import openai
import pydantic
import pytest
from openai.types import Batch, Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

from tests.service import API_KEYS, MODEL, Service, running

FINGERPRINT = re.compile(r"fp_inferq_\S+")
GREEDY = {"model": MODEL, "temperature": 0, "ignore_eos": True}
CHAT = [{"role": "user", "content": "Hello there"}]
# Fields of ours the openai types do not have (our models carry their context length and weight formats).
OURS = {"Model": {"max_model_len", "load_in_low_bit"}}


@pytest.fixture(scope="module")
def service(redis_url, demo_model_dir, tmp_path_factory):
    svc = Service(redis_url, demo_model_dir, tmp_path_factory.mktemp("openai-fields-logs"))
    svc.start_webhook_worker()  # it runs batch expansion
    with running(svc) as started:
        yield started


@pytest.fixture(scope="module")
def client(service):
    with service.client() as c:
        yield c


@pytest.fixture(scope="module")
def oai(service):
    return openai.OpenAI(base_url=f"{service.url}/v1", api_key=API_KEYS[0], max_retries=0)


def declared(model_cls: type[pydantic.BaseModel], body: dict):
    """`body` validated as the openai type, with every field we send declared by it (none left as an extra)."""
    obj = model_cls.model_validate(body)
    _no_extras(obj, body, model_cls.__name__)
    return obj


def _no_extras(obj, data, where: str) -> None:
    if isinstance(obj, pydantic.BaseModel):
        extra = set(obj.model_extra or {}) - OURS.get(type(obj).__name__, set())
        assert not extra, f"{where}: {sorted(extra)} are not fields of {type(obj).__name__}"
        for name, value in data.items():
            if name in type(obj).model_fields:
                _no_extras(getattr(obj, name), value, f"{where}.{name}")
    elif isinstance(obj, list) and isinstance(data, list):
        for index, (item, value) in enumerate(zip(obj, data)):
            _no_extras(item, value, f"{where}[{index}]")
    elif isinstance(obj, dict) and isinstance(data, dict):
        for key, value in data.items():
            _no_extras(obj.get(key), value, f"{where}.{key}")


def declared_completion_chunk(chunk: dict) -> Completion:
    """A completions stream chunk as the openai type: its choices' finish_reason is null until the last (as
    OpenAI's own chunks), which the type (shared with whole completions) does not allow, so that one field is
    filled in for the check (the SDK itself builds stream chunks without validating them)."""
    filled = {**chunk, "choices": [{**c, "finish_reason": c["finish_reason"] or "length"} for c in chunk["choices"]]}
    return declared(Completion, filled)


def check_envelope(body: dict, object_name: str) -> None:
    assert body["object"] == object_name and body["model"] == MODEL
    assert FINGERPRINT.fullmatch(body["system_fingerprint"]), body["system_fingerprint"]
    assert abs(body["created"] - time.time()) < 300 and isinstance(body["created"], int)


def check_usage(usage: dict) -> None:
    assert set(usage["prompt_tokens_details"]) == {"cached_tokens"}
    assert 0 <= usage["prompt_tokens_details"]["cached_tokens"] < usage["prompt_tokens"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]


def assert_400(response: httpx.Response, param: str) -> dict:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "invalid_request_error"
    assert error["param"] == param and error["message"], error
    return error


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    with client.stream("POST", path, json={**body, "stream": True}) as response:
        assert response.status_code == 200
        lines = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# ---- requests -----------------------------------------------------------------------------------------------------

def test_several_prompts_answer_each_prompts_choices_in_order(client, oai):
    """OpenAI's list of prompts (text or token ids): one completion, prompt k's choice i at index k * n + i, usage
    summed; each prompt's choices are what it gets alone."""
    single = {p: client.post("/v1/completions", json={**GREEDY, "prompt": p, "max_tokens": 5}).json()
              for p in ("Hi", "Yo there")}
    both = client.post("/v1/completions", json={**GREEDY, "prompt": ["Hi", "Yo there"], "n": 2, "max_tokens": 5,
                                                "user": "someone", "seed": 7})
    assert both.status_code == 200, both.text
    body = both.json()
    declared(Completion, body)
    check_envelope(body, "text_completion")
    assert [c["index"] for c in body["choices"]] == [0, 1, 2, 3]
    texts = [c["text"] for c in body["choices"]]
    assert texts == [single["Hi"]["choices"][0]["text"]] * 2 + [single["Yo there"]["choices"][0]["text"]] * 2
    assert body["usage"]["prompt_tokens"] == sum(s["usage"]["prompt_tokens"] for s in single.values())
    assert body["usage"]["completion_tokens"] == 4 * 5
    check_usage(body["usage"])
    ids = [client.post("/tokenize", json={"model": MODEL, "prompt": p}).json()["tokens"] for p in ("Hi", "Yo there")]
    as_ids = oai.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert [c.text for c in as_ids.choices] == [texts[0], texts[2]]
    # Streamed: every chunk names its choice; each choice's text is the non-streamed one.
    streamed: dict[int, str] = {}
    finish: dict[int, str] = {}
    for chunk in oai.completions.create(model=MODEL, prompt=["Hi", "Yo there"], n=2, max_tokens=5, temperature=0,
                                        stream=True, extra_body={"ignore_eos": True}):
        for choice in chunk.choices:
            streamed[choice.index] = streamed.get(choice.index, "") + choice.text
            if choice.finish_reason:
                finish[choice.index] = choice.finish_reason
    assert [streamed[i] for i in range(4)] == texts and finish == dict.fromkeys(range(4), "length")


def test_a_job_of_several_prompts_cancels_every_part(client, service):
    job = client.post("/v1/jobs", json={**GREEDY, "prompt": ["one", "two", "three"], "max_tokens": 1500}).json()
    deadline = time.monotonic() + 30
    while service.store.get(job["id"]).first_token_at is None:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    client.post(f"/v1/jobs/{job['id']}/cancel")
    done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 15}).json()
    assert done["status"] == "cancelled", done["status"]
    assert len(done["result"]["choices"]) == 3 and done["usage"]["completion_tokens"] < 3 * 1500
    assert {c["finish_reason"] for c in done["result"]["choices"]} <= {"stop", "length"}  # never "abort"
    declared(Completion, done["result"])
    check_usage(done["usage"])
    events = [json.loads(line[6:]) for line in client.get(f"/v1/jobs/{job['id']}/events").text.splitlines()
              if line.startswith("data: ")]
    assert all(c["finish_reason"] != "abort" for e in events if e["type"] == "delta" for c in e["choices"])
    deadline = time.monotonic() + 10  # every part's KV blocks are free again (heartbeats report them)
    while True:
        worker = service.store.registry.workers(MODEL)[0]
        if worker["num_free_kv_blocks"] == worker["num_kv_blocks"] or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert worker["num_free_kv_blocks"] == worker["num_kv_blocks"]


def test_echo_puts_the_prompt_before_each_choice(client):
    body = {**GREEDY, "prompt": ["Hello there", "Bye"], "max_tokens": 4, "n": 2}
    plain = client.post("/v1/completions", json=body).json()["choices"]
    echoed = client.post("/v1/completions", json={**body, "echo": True}).json()
    declared(Completion, echoed)
    prompts = ["Hello there"] * 2 + ["Bye"] * 2
    assert [c["text"] for c in echoed["choices"]] == [p + c["text"] for p, c in zip(prompts, plain)]
    chunks = sse(client, "/v1/completions", {**body, "echo": True})
    texts: dict[int, str] = {}
    for chunk in chunks:
        declared_completion_chunk(chunk)
        check_envelope(chunk, "text_completion")
        for choice in chunk["choices"]:
            texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    assert [texts[i] for i in range(4)] == [c["text"] for c in echoed["choices"]]
    ids = client.post("/tokenize", json={"model": MODEL, "prompt": "Hello there", "add_special_tokens": False})
    as_ids = client.post("/v1/completions", json={**GREEDY, "prompt": ids.json()["tokens"], "max_tokens": 2,
                                                  "echo": True}).json()
    assert as_ids["choices"][0]["text"].startswith("Hello there")


def test_echo_with_logprobs_scores_the_prompt(client):
    """What lm-evaluation-harness's loglikelihood requests send (echo, logprobs, token ids): the prompt's tokens come
    first in logprobs, the first with a null log-prob; each prompt token's log-prob is the one the model gives it
    after the tokens before it -- the same as a request that ends just before it reports for its generated token."""
    prompt = client.post("/tokenize", json={"model": MODEL, "prompt": "The cat sat on",
                                            "add_special_tokens": False}).json()["tokens"]
    forced = prompt[1]  # made the generated token by logit_bias; logprobs are the model's own, before any bias
    first = client.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": 1, "logprobs": 2,
                                                 "logit_bias": {str(forced): 100}}).json()
    generated = first["choices"][0]["logprobs"]
    extended = prompt + [forced]
    body = client.post("/v1/completions", json={**GREEDY, "prompt": extended, "max_tokens": 2, "logprobs": 2,
                                                "echo": True}).json()
    logprobs = body["choices"][0]["logprobs"]
    assert len(logprobs["tokens"]) == len(extended) + body["usage"]["completion_tokens"]
    assert logprobs["token_logprobs"][0] is None and logprobs["top_logprobs"][0] is None
    assert all(isinstance(v, float) for v in logprobs["token_logprobs"][1:])
    assert logprobs["token_logprobs"][len(prompt)] == pytest.approx(generated["token_logprobs"][0], abs=1e-4)
    assert logprobs["top_logprobs"][len(prompt)] == pytest.approx(generated["top_logprobs"][0], abs=1e-4)
    assert logprobs["text_offset"] == sorted(logprobs["text_offset"])
    text = body["choices"][0]["text"]
    for token, offset in zip(logprobs["tokens"][len(extended):], logprobs["text_offset"][len(extended):]):
        assert text[offset:].startswith(token) or token.startswith("bytes:")


def test_logit_bias_reaches_the_engine(client):
    """+100 on one token makes greedy decoding pick only it; -100 on the byte tokens bans them; an id past the
    vocabulary is ignored."""
    token = client.post("/tokenize", json={"model": MODEL, "prompt": " the", "add_special_tokens": False}).json()
    forced = token["tokens"][-1]
    body = client.post("/v1/completions", json={**GREEDY, "prompt": "Once", "max_tokens": 6, "logprobs": 0,
                                                "logit_bias": {str(forced): 100, "99999999": 5}}).json()
    assert body["usage"]["completion_tokens"] == 6
    tokens = body["choices"][0]["logprobs"]["tokens"]
    assert tokens == [tokens[0]] * 6 and body["choices"][0]["text"] == tokens[0] * 6
    piece = client.post("/detokenize", json={"model": MODEL, "tokens": [forced]}).json()["prompt"]
    assert tokens[0].strip() == piece.strip()  # the forced token (decoded alone, SentencePiece drops its space)
    ban = {str(i): -100 for i in range(3, 259)}  # the demo vocabulary's byte tokens
    banned = client.post("/v1/completions", json={**GREEDY, "prompt": "café 😀", "max_tokens": 8, "logprobs": 0,
                                                  "logit_bias": ban}).json()
    assert not any(t.startswith("bytes:") for t in banned["choices"][0]["logprobs"]["tokens"])


def test_accepted_fields_that_change_nothing(client):
    chat = client.post("/v1/chat/completions", json={
        **GREEDY, "messages": CHAT, "max_completion_tokens": 3, "user": "u-1", "seed": 3, "service_tier": "auto",
        "store": False, "modalities": ["text"], "n": 2})
    assert chat.status_code == 200, chat.text
    body = chat.json()
    declared(ChatCompletion, body)
    check_envelope(body, "chat.completion")
    assert [c["index"] for c in body["choices"]] == [0, 1] and body["usage"]["completion_tokens"] == 6
    check_usage(body["usage"])
    completion = client.post("/v1/completions", json={**GREEDY, "prompt": "x", "max_tokens": 2, "suffix": None,
                                                      "best_of": 1, "service_tier": "default"})
    assert completion.status_code == 200, completion.text


@pytest.mark.parametrize("path, fields, param", [
    ("/v1/completions", {"suffix": "end"}, "suffix"),
    ("/v1/completions", {"best_of": 3}, "best_of"),
    ("/v1/completions", {"logprobs": 21}, "logprobs"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {"prompt": [[]]}, "prompt"),
    ("/v1/completions", {"prompt": ["Hi", ""]}, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], [-3]]}, "prompt"),
    ("/v1/completions", {"prompt": ["Hi", 3]}, "prompt"),
    ("/v1/completions", {"logit_bias": {"x": 1}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": 101}}, "logit_bias"),
    ("/v1/completions", {"logit_bias": {"5": "a"}}, "logit_bias"),
    ("/v1/completions", {"service_tier": "flex"}, "service_tier"),
    ("/v1/chat/completions", {"logit_bias": {"-1": 1}}, "logit_bias"),
    ("/v1/chat/completions", {"logprobs": 25}, "logprobs"),
    ("/v1/chat/completions", {"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ("/v1/chat/completions", {"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ("/v1/chat/completions", {"modalities": ["text", "audio"]}, "modalities"),
    ("/v1/chat/completions", {"prediction": {"type": "content", "content": "x"}}, "prediction"),
    ("/v1/chat/completions", {"web_search_options": {}}, "web_search_options"),
    ("/v1/chat/completions", {"functions": [{"name": "f", "parameters": {}}]}, "functions"),
    ("/v1/chat/completions", {"function_call": "auto"}, "function_call"),
    ("/v1/chat/completions", {"service_tier": "priority"}, "service_tier"),
    ("/v1/chat/completions", {"store": True}, "store"),
    ("/v1/chat/completions", {"reasoning_effort": "low"}, "reasoning_effort"),
])
def test_what_we_do_not_support_is_a_400_naming_it(client, path, fields, param):
    base = {"prompt": "Hi"} if path == "/v1/completions" else {"messages": CHAT}
    error = assert_400(client.post(path, json={"model": MODEL, "max_tokens": 2, **base, **fields}), param)
    if param not in ("prompt", "logit_bias", "logprobs", "top_logprobs"):
        assert error["code"] in ("unsupported_parameter", "unsupported_value"), error
    # The same body as a job is refused the same way, before anything is queued.
    assert_400(client.post("/v1/jobs", json={"model": MODEL, "max_tokens": 2, **base, **fields}), param)


def test_batch_lines_with_unsupported_fields_are_error_lines(oai):
    lines = [{"custom_id": "ok", "method": "POST", "url": "/v1/completions",
              "body": {**GREEDY, "prompt": ["a", "b"], "max_tokens": 3}},
             {"custom_id": "suffix", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": "a", "suffix": "z"}},
             {"custom_id": "bias", "method": "POST", "url": "/v1/completions",
              "body": {"model": MODEL, "prompt": "a", "logit_bias": {"1": 300}}}]
    done = _run_batch(oai, lines)
    errors = {e["custom_id"]: e for e in _lines(oai, done.error_file_id)}
    assert set(errors) == {"suffix", "bias"}
    assert "body.suffix" in errors["suffix"]["error"]["message"]
    assert "body.logit_bias" in errors["bias"]["error"]["message"]


# ---- replies ------------------------------------------------------------------------------------------------------

def test_completion_logprobs_are_decoded_text(client):
    body = client.post("/v1/completions", json={**GREEDY, "prompt": "The quick brown fox", "max_tokens": 16,
                                                "logprobs": 3}).json()
    declared(Completion, body)
    check_envelope(body, "text_completion")
    choice = body["choices"][0]
    logprobs, text = choice["logprobs"], choice["text"]
    assert len(logprobs["tokens"]) == len(logprobs["token_logprobs"]) == len(logprobs["text_offset"]) == 16
    assert logprobs["text_offset"][0] == 0 and logprobs["text_offset"] == sorted(logprobs["text_offset"])
    for token, offset, top, logprob in zip(logprobs["tokens"], logprobs["text_offset"], logprobs["top_logprobs"],
                                           logprobs["token_logprobs"]):
        assert "\u2581" not in token and not re.fullmatch(r"<0x[0-9A-F]{2}>", token), token  # no raw pieces
        if not token.startswith("bytes:"):  # (bytes the model wrote that are not UTF-8 read as U+FFFD in text)
            assert text[offset:offset + len(token)] in (token, "\ufffd" * len(token)), (text, offset, token)
        assert top[token] == logprob and 1 <= len(top) <= 4
    if not any(t.startswith("bytes:") for t in logprobs["tokens"]) and "\ufffd" not in text:
        assert "".join(logprobs["tokens"]) == text


def test_chat_logprobs_bytes_concatenate_to_the_content(client):
    # The byte tokens (ids 3-258 of the demo's SentencePiece vocabulary) banned: every token is whole text here;
    # tokens that are part of a character are checked on the tokenizer itself (test_token_bytes_of_split_characters).
    ban = {str(i): -100 for i in range(3, 259)}
    body = client.post("/v1/chat/completions", json={**GREEDY, "messages": CHAT, "max_tokens": 12, "logprobs": True,
                                                     "top_logprobs": 2, "logit_bias": ban}).json()
    declared(ChatCompletion, body)
    content = body["choices"][0]["message"]["content"]
    items = body["choices"][0]["logprobs"]["content"]
    assert len(items) == 12
    assert b"".join(bytes(item["bytes"]) for item in items) == content.encode()
    for item in items:
        assert bytes(item["bytes"]).decode() == item["token"] and len(item["top_logprobs"]) == 2


def test_token_bytes_of_split_characters(demo_model_dir):
    """The worker's token texts on the real demo tokenizer: byte-fallback tokens of one character concatenate to
    its bytes, each named as OpenAI names a partial character, and the offsets point at the character's start."""
    from engine.loader import load_tokenizer
    from engine.outputs import CompletionOutput
    from worker.openai_format import completion_logprobs, token_text

    tokenizer = load_tokenizer(demo_model_dir)
    text = " café 😀 ok"
    ids = tokenizer.encode(text, add_special_tokens=False)
    texts = token_text(tokenizer)
    assert b"".join(texts.bytes_of(i) for i in ids) == text.encode()
    assert any(texts.text_of(i).startswith("bytes:\\x") for i in ids)
    logprobs = completion_logprobs(CompletionOutput(0, text, ids, logprobs=[{i: -1.0} for i in ids]), texts)
    for token, offset in zip(logprobs["tokens"], logprobs["text_offset"]):
        if token.startswith("bytes:"):
            assert text[offset] in "é😀"
        else:
            assert text[offset:offset + len(token)] == token


def test_chat_stream_opens_with_the_role_and_carries_usage_throughout(client):
    body = {**GREEDY, "messages": CHAT, "max_tokens": 6, "n": 2}
    chunks = sse(client, "/v1/chat/completions", body)
    for chunk in chunks:
        declared(ChatCompletionChunk, chunk)
        check_envelope(chunk, "chat.completion.chunk")
    assert [c["choices"][0] for c in chunks[:2]] == [
        {"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
        for i in (0, 1)]
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[2:])
    assert len({(c["id"], c["created"]) for c in chunks}) == 1
    done = client.post("/v1/chat/completions", json=body).json()
    assert done["id"].startswith("chatcmpl-") and done["system_fingerprint"] == chunks[0]["system_fingerprint"]
    for index in (0, 1):
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks
                       if c["choices"][0]["index"] == index)
        assert text == done["choices"][index]["message"]["content"]

    continuous = sse(client, "/v1/chat/completions", {**body, "n": 1, "stream_options": {
        "include_usage": True, "continuous_usage_stats": True}})
    assert all(c.get("usage") for c in continuous)
    for chunk in continuous:
        declared(ChatCompletionChunk, chunk)
        check_usage(chunk["usage"])
    assert continuous[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert continuous[0]["usage"]["completion_tokens"] == 0
    counts = [c["usage"]["completion_tokens"] for c in continuous]
    assert counts == sorted(counts) and counts[-1] == 6 and continuous[-1]["choices"] == []
    assert {c["usage"]["prompt_tokens"] for c in continuous} == {done["usage"]["prompt_tokens"]}
    plain = sse(client, "/v1/completions", {**GREEDY, "prompt": "Hi", "max_tokens": 3,
                                            "stream_options": {"continuous_usage_stats": True}})
    assert [c["usage"]["completion_tokens"] for c in plain][-1] == 3 and all("choices" in c for c in plain)
    for chunk in plain:
        declared_completion_chunk(chunk)


BAN_BYTES = {str(i): -100 for i in range(3, 259)}  # the demo vocabulary's byte tokens: every token is whole text


def _close(streamed: list[float], whole: list[float]) -> bool:
    return len(streamed) == len(whole) and all(abs(a - b) < 1e-4 for a, b in zip(streamed, whole))


def test_streamed_chat_chunks_carry_their_tokens_logprobs(client):
    body = {**GREEDY, "messages": CHAT, "max_tokens": 12, "n": 2, "logprobs": True, "top_logprobs": 2,
            "logit_bias": BAN_BYTES}
    whole = client.post("/v1/chat/completions", json=body).json()
    chunks = sse(client, "/v1/chat/completions", body)
    for chunk in chunks:
        declared(ChatCompletionChunk, chunk)
    for index in (0, 1):
        choices = [c["choices"][0] for c in chunks if c["choices"][0]["index"] == index]
        items = [item for c in choices if c["logprobs"] for item in c["logprobs"]["content"]]
        expected = whole["choices"][index]["logprobs"]["content"]
        assert [i["token"] for i in items] == [i["token"] for i in expected] and len(items) == 12
        assert _close([i["logprob"] for i in items], [i["logprob"] for i in expected])
        for item, want in zip(items, expected):
            assert [t["token"] for t in item["top_logprobs"]] == [t["token"] for t in want["top_logprobs"]]
            assert _close([t["logprob"] for t in item["top_logprobs"]], [t["logprob"] for t in want["top_logprobs"]])
        content = "".join(c["delta"].get("content") or "" for c in choices)
        assert content == whole["choices"][index]["message"]["content"]
        assert b"".join(bytes(item["bytes"]) for item in items) == content.encode()


def test_streamed_completion_chunks_carry_their_tokens_logprobs(client):
    # Byte tokens allowed: a character split over tokens must keep the body's text offsets.
    body = {**GREEDY, "prompt": "The quick brown fox, café 😀", "max_tokens": 16, "n": 2, "logprobs": 2}
    whole = client.post("/v1/completions", json=body).json()
    chunks = sse(client, "/v1/completions", body)
    for chunk in chunks:
        declared_completion_chunk(chunk)
    for index in (0, 1):
        parts = [c["logprobs"] for chunk in chunks for c in chunk["choices"] if c["index"] == index and c["logprobs"]]
        expected = whole["choices"][index]["logprobs"]
        streamed = {key: [x for part in parts for x in part[key]] for key in expected}
        assert streamed["tokens"] == expected["tokens"] and len(streamed["tokens"]) == 16
        assert streamed["text_offset"] == expected["text_offset"]
        assert _close(streamed["token_logprobs"], expected["token_logprobs"])
        for top, want in zip(streamed["top_logprobs"], expected["top_logprobs"]):
            assert list(top) == list(want) and _close(list(top.values()), list(want.values()))


def test_streams_without_logprobs_have_none(client):
    chat = sse(client, "/v1/chat/completions", {**GREEDY, "messages": CHAT, "max_tokens": 4})
    completion = sse(client, "/v1/completions", {**GREEDY, "prompt": "Hi", "max_tokens": 4})
    choices = [c for chunk in chat + completion for c in chunk["choices"]]
    # (A short job may come as one chunk: a reader that starts after it ended gets the whole text at once.)
    assert any(c.get("text") for c in choices) and any(c.get("delta", {}).get("content") for c in choices)
    assert all(c["logprobs"] is None for c in choices)


def test_stream_logprobs_split_as_the_body_does(demo_model_dir):
    """Fed a step at a time (as the output writer feeds it), a choice's logprobs concatenate to its body's, even
    where a character is split over byte tokens (their offsets wait for the end of the run)."""
    from api.streams import join_logprobs
    from engine.loader import load_tokenizer
    from engine.outputs import CompletionOutput
    from worker.openai_format import LogprobStream, chat_logprobs, completion_logprobs, token_text

    tokenizer = load_tokenizer(demo_model_dir)
    ids = tokenizer.encode(" café 😀😀 ok", add_special_tokens=False)
    entries = [{token_id: -1.0 - i, 5: -9.0} for i, token_id in enumerate(ids)]
    whole = CompletionOutput(0, "", ids, logprobs=entries, finish_reason="length")
    texts = token_text(tokenizer)
    for chat, expected in ((False, completion_logprobs(whole, texts, 4)), (True, chat_logprobs(whole, texts, 2))):
        stream, joined = LogprobStream(tokenizer, chat, 2, offset=4), None
        for k in range(0, len(ids), 2):  # the live lists already hold every token, as the engine's may
            step = CompletionOutput(0, "", ids, "", ids[k:k + 2], "length" if k + 2 >= len(ids) else None,
                                    logprobs=entries)
            joined = join_logprobs(joined, stream.take(step))
        assert joined == expected


def test_a_restarted_stream_sends_each_tokens_logprobs_once():
    """After a restart the rerun's logprobs are skipped per token, as far as they were sent, however its text
    deltas split."""
    import asyncio

    from api.job_record import Job, JobStatus
    from api.routes.openai import _sse

    def delta(text: str, tokens: list[str]) -> dict:
        logprobs = {"tokens": tokens, "token_logprobs": [-1.0] * len(tokens),
                    "top_logprobs": [{t: -1.0} for t in tokens], "text_offset": [0] * len(tokens)}
        return {"type": "delta", "choices": [{"index": 0, "text": text, "finish_reason": None, "logprobs": logprobs}]}

    events = [delta("ab", ["a", "b"]), delta("c", ["c"]), {"type": "restart", "attempt": 2},
              delta("a", ["a", "b"]),  # the rerun's text held back a token: its deltas split otherwise
              delta("bcd", ["c", "d"]), {"type": "end", "status": "succeeded"}]
    job = Job("j1", "owner", MODEL, "completions", {}, status=JobStatus.SUCCEEDED, created_at=time.time())

    class Streams:
        async def event_batches(self, job_id):
            for event in events:
                yield [event]

        async def get(self, job_id):
            return job

    async def collect() -> list[dict]:
        return [json.loads(c[6:]) async for c in _sse(None, Streams(), job, "completions") if c != "data: [DONE]\n\n"]

    chunks = asyncio.run(collect())
    for chunk in chunks:
        declared_completion_chunk(chunk)
    choices = [c for chunk in chunks for c in chunk["choices"]]
    assert "".join(c["text"] for c in choices) == "abcd"
    assert [t for c in choices if c["logprobs"] for t in c["logprobs"]["tokens"]] == ["a", "b", "c", "d"]


def test_job_results_are_openai_bodies(client):
    job = client.post("/v1/jobs", json={**GREEDY, "messages": CHAT, "max_tokens": 4}).json()
    done = client.get(f"/v1/jobs/{job['id']}", params={"wait": 30}).json()
    assert done["status"] == "succeeded"
    declared(ChatCompletion, done["result"])
    check_envelope(done["result"], "chat.completion")
    check_usage(done["usage"])


def test_models_are_openai_model_objects(client, oai):
    listed = client.get("/v1/models").json()["data"]
    model = declared(Model, listed[0])
    assert model.id == MODEL and model.owned_by == "inferq" and 0 < model.created <= time.time()
    assert declared(Model, client.get(f"/v1/models/{MODEL}").json()).created == model.created
    assert oai.models.retrieve(MODEL).created == model.created
    missing = client.get("/v1/models/nope")
    assert missing.status_code == 404
    assert missing.json()["error"] | {"message": ""} == {"message": "", "type": "invalid_request_error",
                                                           "param": "model", "code": "model_not_found"}


def _run_batch(oai, lines: list[dict]):
    text = "".join(json.dumps(line) + "\n" for line in lines)
    file_id = oai.files.create(file=("in.jsonl", io.BytesIO(text.encode())), purpose="batch").id
    batch = oai.batches.create(input_file_id=file_id, endpoint="/v1/completions", completion_window="24h")
    deadline = time.monotonic() + 60
    while batch.status not in ("completed", "failed", "cancelled", "expired"):
        assert time.monotonic() < deadline, batch.status
        time.sleep(0.2)
        batch = oai.batches.retrieve(batch.id)
    return batch


def _lines(oai, file_id: str | None) -> list[dict]:
    return [json.loads(x) for x in oai.files.content(file_id).text.splitlines() if x] if file_id else []


def test_batches_carry_their_model_and_usage(oai, service):
    instruction = " ".join(f"Step {k}: read the line, then answer it in a few words." for k in range(6))
    lines = [{"custom_id": f"r{i}", "method": "POST", "url": "/v1/completions",
              "body": {**GREEDY, "prompt": f"{instruction} prompt {i}", "max_tokens": 3 + i}} for i in range(3)]
    done = _run_batch(oai, lines)
    assert done.status == "completed"
    with service.client() as client:
        body = client.get(f"/v1/batches/{done.id}").json()
    batch = declared(Batch, body)
    assert batch.model == MODEL
    outputs = [line["response"]["body"] for line in _lines(oai, done.output_file_id)]
    for output in outputs:
        declared(Completion, output)
        check_usage(output["usage"])
    assert batch.usage.input_tokens == sum(o["usage"]["prompt_tokens"] for o in outputs)
    assert batch.usage.output_tokens == 3 + 4 + 5
    assert batch.usage.total_tokens == batch.usage.input_tokens + batch.usage.output_tokens
    # The lines share their instruction: all but the first find it in the prefix cache.
    assert batch.usage.input_tokens_details.cached_tokens == sum(
        o["usage"]["prompt_tokens_details"]["cached_tokens"] for o in outputs) > 0


# ---- /tokenize and /detokenize --------------------------------------------------------------------------------

def test_tokenize_counts_what_the_worker_counts(client):
    prompt = "The quick brown fox, café 😀"
    done = client.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": 1}).json()
    tokens = client.post("/tokenize", json={"model": MODEL, "prompt": prompt, "return_token_strs": True}).json()
    assert set(tokens) == {"count", "max_model_len", "tokens", "token_strs"}
    assert tokens["count"] == len(tokens["tokens"]) == done["usage"]["prompt_tokens"]
    assert tokens["max_model_len"] == 2048 and len(tokens["token_strs"]) == tokens["count"]
    assert tokens["token_strs"][0] == "<s>" and tokens["token_strs"][1].startswith("\u2581")
    assert client.post("/detokenize", json={"model": MODEL, "tokens": tokens["tokens"][1:]}).json() == {
        "prompt": prompt}
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}]
    chat = client.post("/v1/chat/completions", json={**GREEDY, "messages": messages, "max_tokens": 1}).json()
    rendered = client.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    assert rendered["count"] == chat["usage"]["prompt_tokens"] and rendered["token_strs"] is None
    assert client.post("/tokenize", json={"prompt": "x"}).json()["count"] == 2  # one model served: it is the default


@pytest.mark.parametrize("path, body, status, param", [
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "messages": []}, 400, "messages"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     400, "messages"),
    ("/detokenize", {"model": MODEL, "tokens": [10**7]}, 400, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": [-1]}, 400, "tokens.0"),
    ("/detokenize", {"model": "nope", "tokens": [1]}, 404, "model"),
])
def test_tokenize_errors(client, path, body, status, param):
    response = client.post(path, json=body)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["param"] == param, error
    with httpx.Client(base_url=client.base_url) as anonymous:
        assert anonymous.post(path, json=body).status_code == 401
