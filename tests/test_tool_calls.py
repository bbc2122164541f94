"""Tool-call formats (api/tool_calls.py): replies parsed into OpenAI's tool_calls, streamed as tool-call deltas, and
the grammar that holds a reply to a format."""
from __future__ import annotations

import json

import pytest
import xgrammar as xgr

from api.tool_calls import ToolCallStream, constraint, parse, parser_for_template

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
HERMES = ('Let me check.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
          '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>')
LLAMA = '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Paris"}}; {"name": "get_weather", ' \
        '"parameters": {"city": "Oslo"}}'


def calls_of(calls: list[dict]) -> list[tuple[str, dict]]:
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


@pytest.mark.parametrize("parser, text", [("hermes", HERMES), ("llama3_json", LLAMA)])
def test_parse_two_calls(parser, text):
    content, calls = parse(parser, text)
    assert calls_of(calls) == [("get_weather", {"city": "Paris"}), ("get_weather", {"city": "Oslo"})]
    assert all(c["type"] == "function" and c["id"].startswith("call_") for c in calls)
    assert len({c["id"] for c in calls}) == 2
    assert content == ("Let me check." if parser == "hermes" else None)


@pytest.mark.parametrize("parser, text", [
    ("hermes", "Just text, <b>no</b> calls."),
    ("hermes", "<tool_call>\n{not json}\n</tool_call>"),
    ("llama3_json", "Hello there"),
    ("llama3_json", '{"no_name": 1}'),
])
def test_text_that_is_not_a_call_stays_content(parser, text):
    assert parse(parser, text) == (text, [])


@pytest.mark.parametrize("parser, text", [("hermes", HERMES), ("llama3_json", LLAMA)])
@pytest.mark.parametrize("piece", [1, 3, 7, 1000])
def test_streamed_in_any_pieces_gives_the_same_calls(parser, text, piece):
    stream, content, deltas = ToolCallStream(parser), "", []
    chunks = [text[i:i + piece] for i in range(0, len(text), piece)]
    for n, chunk in enumerate(chunks):
        sent, new = stream.feed(chunk, finished=n == len(chunks) - 1)
        content += sent
        deltas += new
    assert [d["index"] for d in deltas] == [0, 1]
    assert calls_of(deltas) == calls_of(parse(parser, text)[1])
    assert "<tool_call>" not in content and "get_weather" not in content
    assert content.strip() == (parse(parser, text)[0] or "")


def test_a_stream_without_calls_is_all_content():
    stream = ToolCallStream("hermes")
    out = [stream.feed(piece, False)[0] for piece in ("a <", "b> c <tool", "s>")] + [stream.feed("", True)[0]]
    assert "".join(out) == "a <b> c <tools>"


def test_parser_from_the_chat_template():
    assert parser_for_template("{{ '<|python_tag|>' }} ipython") == "llama3_json"
    assert parser_for_template("<tool_call> ... </tool_call>") == "hermes"
    assert parser_for_template(None) == "hermes"


@pytest.mark.parametrize("parser", ["hermes", "llama3_json"])
@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}])
def test_the_constraint_accepts_a_call_and_refuses_text(parser, choice):
    tag = constraint(parser, [WEATHER], choice, parallel_tool_calls=True)
    grammar = xgr.Grammar.from_structural_tag(tag)
    call = HERMES.split("\n", 1)[1].split("\n<tool_call>")[0] if parser == "hermes" else \
        '{"name": "get_weather", "parameters": {"city": "Paris"}}'
    assert xgr.testing._is_grammar_accept_string(grammar, call)
    assert not xgr.testing._is_grammar_accept_string(grammar, "I will not call anything.")


def test_no_constraint_without_tools_or_with_none():
    assert constraint("hermes", [], "required", True) is None
    assert constraint("hermes", [WEATHER], "none", True) is None
