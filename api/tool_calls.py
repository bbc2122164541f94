"""Tool calls in chat completions: the formats models write them in, parsed into OpenAI's `tool_calls`, and the
grammar that holds a model to them when a call is required.

Two formats, named as vLLM's `--tool-call-parser` values:
  hermes       Hermes 2 Pro, Qwen2.5 and Qwen3: `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`,
               any number of them, text around them allowed (xgrammar's "qwen_3" structural tag);
  llama3_json  Llama 3.1-3.3: the whole reply is `{"name": ..., "parameters": {...}}` (several separated by `;`),
               after an optional `<|python_tag|>` (xgrammar's "llama" structural tag).
A model's chat template tells which it was trained on (`parser_for_template`).

Pure Python (no torch): the worker parses results and streams with it; `constraint` alone needs xgrammar, which it
imports when called (in the worker).
"""
from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

PARSERS = ("hermes", "llama3_json")
_XGRAMMAR_FORMAT = {"hermes": "qwen_3", "llama3_json": "llama"}
_HERMES_CALL = re.compile(r"<tool_call>\s*(.*?)\s*</tool_call>", re.DOTALL)
_HERMES_OPEN = "<tool_call>"
_PYTHON_TAG = "<|python_tag|>"


def parser_for_template(chat_template: str | None) -> str:
    """The format a chat template teaches: Llama 3's (it speaks of `<|python_tag|>` or the `ipython` role), else
    Hermes tags, which is also the default for templates that know no tools."""
    if chat_template and (_PYTHON_TAG in chat_template or "ipython" in chat_template):
        return "llama3_json"
    return "hermes"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def parse(parser: str, text: str) -> tuple[str | None, list[dict[str, Any]]]:
    """(content, tool_calls in OpenAI's shape) of a finished reply. Text that is not a well-formed call stays
    content, as vLLM's parsers leave it."""
    calls: list[dict[str, Any]] = []
    if parser == "hermes":
        rest = []
        position = 0
        for match in _HERMES_CALL.finditer(text):
            call = _call(match.group(1), "arguments")
            if call is None:
                continue
            rest.append(text[position:match.start()])
            position = match.end()
            calls.append(call)
        rest.append(text[position:])
        content = "".join(rest).strip() if calls else text
    else:
        content, calls = _parse_llama(text)
    return (content or None) if calls else text, calls


def _parse_llama(text: str) -> tuple[str, list[dict[str, Any]]]:
    body = text.strip()
    body = body[len(_PYTHON_TAG):].lstrip() if body.startswith(_PYTHON_TAG) else body
    decoder, calls, index = json.JSONDecoder(), [], 0
    while index < len(body):
        try:
            value, end = decoder.raw_decode(body, index)
        except ValueError:
            return text, []
        call = _call_of(value, "parameters")
        if call is None:
            return text, []
        calls.append(call)
        index = end
        while index < len(body) and body[index] in " \t\r\n;":
            index += 1
    return "", calls


def _call(raw: str, arguments_key: str) -> dict[str, Any] | None:
    try:
        return _call_of(json.loads(raw), arguments_key)
    except ValueError:
        return None


def _call_of(value: Any, arguments_key: str) -> dict[str, Any] | None:
    """OpenAI's tool call of a decoded `{"name": ..., "arguments"|"parameters": {...}}`, or None."""
    if not isinstance(value, dict) or not isinstance(value.get("name"), str):
        return None
    arguments = value.get(arguments_key, value.get("arguments", value.get("parameters", {})))
    return {"id": new_call_id(), "type": "function",
            "function": {"name": value["name"],
                         "arguments": arguments if isinstance(arguments, str) else json.dumps(arguments)}}


@dataclass(slots=True)
class ToolCallStream:
    """One choice's streamed text, split into content deltas and tool calls: text that may belong to a call is
    held until the call is complete (or the reply ends), then sent as one tool-call delta with whole arguments
    (OpenAI clients join argument fragments, so one fragment is a valid stream)."""

    parser: str
    held: str = ""
    sent_calls: int = 0
    # llama3_json: whether the reply began as a call (then all of it is held to the end); None until it began.
    calls_only: bool | None = None

    def feed(self, text: str, finished: bool) -> tuple[str, list[dict[str, Any]]]:
        """(content to send now, new tool-call deltas) after `text` arrived; everything once `finished`."""
        self.held += text
        if self.parser == "llama3_json":
            if self.calls_only is None and self.held.strip():
                self.calls_only = self.held.lstrip()[:1] in ("{", "<")
            if self.calls_only is False:
                out, self.held = self.held, ""
                return out, []
            if not finished:
                return "", []
            content, calls = parse(self.parser, self.held)
            self.held = ""
            return content or "", self._deltas(calls)
        content, calls = "", []
        while True:
            start = self.held.find(_HERMES_OPEN)
            if start < 0:
                # Hold back a tail that could still grow into "<tool_call>".
                keep = 0 if finished else _partial_tag(self.held)
                content += self.held[:len(self.held) - keep]
                self.held = self.held[len(self.held) - keep:]
                break
            content += self.held[:start]
            self.held = self.held[start:]
            match = _HERMES_CALL.match(self.held)
            if match is None:
                if finished:  # an unclosed call: it stays text
                    content, self.held = content + self.held, ""
                break
            call = _call(match.group(1), "arguments")
            if call is None:
                content += match.group(0)
            else:
                calls.append(call)
            self.held = self.held[match.end():]
        if calls:
            content = content.strip()
        return content, self._deltas(calls)

    def _deltas(self, calls: list[dict[str, Any]]) -> list[dict[str, Any]]:
        deltas = []
        for call in calls:
            deltas.append({"index": self.sent_calls} | call)
            self.sent_calls += 1
        return deltas


def _partial_tag(text: str) -> int:
    """Length of the longest end of `text` that is a beginning of "<tool_call>"."""
    for size in range(min(len(text), len(_HERMES_OPEN) - 1), 0, -1):
        if _HERMES_OPEN.startswith(text[-size:]):
            return size
    return 0


def constraint(parser: str, tools: list[dict], tool_choice: Any, parallel_tool_calls: bool) -> str | None:
    """The xgrammar structural tag (its JSON text) that holds a reply to `parser`'s format: only calls of the given
    tools, with arguments matching their schemas, for "required" (one or more) or a named tool (that one); for
    "auto" free text in which any call the model starts must be well formed. None for "none"."""
    if tool_choice == "none" or not tools:
        return None
    import xgrammar as xgr  # the worker's: it has torch, which xgrammar needs

    tag = xgr.get_model_structural_tag(_XGRAMMAR_FORMAT[parser], tools=tools, tool_choice=tool_choice or "auto",
                                       reasoning=False, parallel_tool_calls=parallel_tool_calls)
    spec = json.loads(tag.model_dump_json())
    if tool_choice == "required" and spec["format"]["type"] == "triggered_tags":
        # xgrammar's "required" still allows free text around the calls (at least one call somewhere); OpenAI's
        # (and vLLM's) reply is the calls alone: one or more of them, one per line, then the end.
        triggered = spec["format"]
        spec["format"] = {"type": "tags_with_separator", "tags": triggered["tags"], "separator": "\n",
                          "at_least_one": True, "stop_after_first": not parallel_tool_calls}
    return json.dumps(spec)
