"""Request and response shapes shared by the API and the worker (one definition for both sides).

Field names and ranges follow the OpenAI API; vLLM's extra sampling fields (top_k, min_p, repetition_penalty,
min_tokens, ignore_eos, stop_token_ids) are accepted too. Nothing here imports torch or the engine.
"""
from __future__ import annotations

import json

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    GetCoreSchemaHandler,
    GetJsonSchemaHandler,
    StrictStr,
    TypeAdapter,
    field_validator,
    model_validator,
)
from pydantic.json_schema import SkipJsonSchema
from pydantic_core import PydanticCustomError, ValidationError

Stop = str | list[str] | None


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema (OpenAI's): the schema the output must match."""

    model_config = ConfigDict(extra="ignore")

    name: Annotated[StrictStr, Field(min_length=1, max_length=64)]
    description: StrictStr | None = None
    schema_: Annotated[dict[str, Any] | None, Field(alias="schema")] = None  # None: any JSON (OpenAI's default)
    strict: bool | None = None  # every output matches the schema whatever this says: the grammar enforces it


class ResponseFormat(BaseModel):
    """response_format (OpenAI's): plain text, any JSON object, or JSON matching a schema."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_given(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError("json_schema is required when type is json_schema")
        return self


class StructuredOutputsRequest(BaseModel):
    """vLLM's structured_outputs: exactly one constraint (engine.sampling_params.StructuredOutputsParams)."""

    model_config = ConfigDict(extra="forbid")

    json_: Annotated[dict[str, Any] | StrictStr | None, Field(alias="json")] = None
    json_object: bool | None = None
    regex: StrictStr | None = None
    choice: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None = None
    grammar: StrictStr | None = None
    structural_tag: StrictStr | None = None
    disable_any_whitespace: bool = False

    @model_validator(mode="after")
    def _exactly_one(self) -> StructuredOutputsRequest:
        given = [name for name in ("json_", "json_object", "regex", "choice", "grammar", "structural_tag")
                 if getattr(self, name) not in (None, False)]
        if len(given) != 1:
            raise ValueError("give exactly one of json, json_object, regex, choice, grammar, structural_tag")
        return self

    def engine_kwargs(self) -> dict[str, Any]:
        kwargs = self.model_dump(by_alias=True, exclude_none=True)
        if not kwargs.get("json_object"):
            kwargs.pop("json_object", None)
        return kwargs


class SamplingFields(BaseModel):
    """What both OpenAI endpoints share; unknown fields are ignored, as OpenAI-compatible servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str
    max_tokens: Annotated[int, Field(ge=1)] | None = None
    temperature: Annotated[float, Field(ge=0, le=2)] = 1.0
    top_p: Annotated[float, Field(gt=0, le=1)] = 1.0
    n: Annotated[int, Field(ge=1, le=16)] = 1
    stop: Stop = None
    # A 64-bit integer, as OpenAI's and vLLM's: the engine seeds a torch generator per choice with seed + index.
    seed: Annotated[int, Field(ge=-2**63, le=2**63 - 1)] | None = None
    presence_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    frequency_penalty: Annotated[float, Field(ge=-2, le=2)] = 0.0
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    user: str | None = None  # accepted and ignored, as vLLM does
    # OpenAI's: {"token id": bias in [-100, 100]} added to the logits; an id past the vocabulary is ignored.
    logit_bias: dict[str, float] | None = None
    service_tier: SkipJsonSchema[Any] = None  # refused unless auto/default (see _unsupported)
    # vLLM extensions
    top_k: Annotated[int, Field(ge=0)] | None = None
    min_p: Annotated[float, Field(ge=0, le=1)] = 0.0
    repetition_penalty: Annotated[float, Field(gt=0, le=10)] = 1.0
    min_tokens: Annotated[int, Field(ge=0)] = 0
    ignore_eos: bool = False
    stop_token_ids: list[Annotated[int, Field(ge=0)]] | None = None
    # Structured outputs: OpenAI's response_format, or vLLM's structured_outputs and its older guided_* fields
    # (at most one of them; the worker checks the schema, regex or grammar itself and answers 400 for a bad one).
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict[str, Any] | StrictStr | None = None
    guided_regex: StrictStr | None = None
    guided_choice: Annotated[list[Annotated[StrictStr, Field(min_length=1)]], Field(min_length=1)] | None = None
    guided_grammar: StrictStr | None = None

    @model_validator(mode="after")
    def _one_output_constraint(self) -> SamplingFields:
        given = [name for name in ("response_format", "structured_outputs", "guided_json", "guided_regex",
                                   "guided_choice", "guided_grammar") if getattr(self, name) is not None]
        if self.response_format is not None and self.response_format.type == "text":
            given.remove("response_format")
        if len(given) > 1:
            raise ValueError(f"give at most one of {', '.join(given)}: each constrains the whole output")
        return self

    def structured_output_kwargs(self) -> dict[str, Any] | None:
        """The engine's StructuredOutputsParams fields for this request's constraint, or None."""
        if self.structured_outputs is not None:
            return self.structured_outputs.engine_kwargs()
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_object":
            return {"json_object": True}
        if fmt is not None and fmt.type == "json_schema":
            schema = fmt.json_schema.schema_
            return {"json": schema} if schema is not None else {"json_object": True}
        for field, kind in (("guided_json", "json"), ("guided_regex", "regex"), ("guided_choice", "choice"),
                            ("guided_grammar", "grammar")):
            if getattr(self, field) is not None:
                return {kind: getattr(self, field)}
        return None

    @field_validator("stop")
    @classmethod
    def _stop_strings(cls, value: Stop) -> Stop:
        stops = [value] if isinstance(value, str) else (value or [])
        if len(stops) > 4 or any(not s for s in stops):
            raise ValueError("stop must be up to 4 non-empty strings")
        return value

    @field_validator("logit_bias", mode="wrap")
    @classmethod
    def _logit_bias(cls, value: Any, handler) -> dict[str, float] | None:
        # Every problem names `logit_bias` itself (not `logit_bias.<key>`), as OpenAI's error does.
        try:
            bias = handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_value", "logit_bias must be an object of token ids (as strings) to "
                                                       "numbers in [-100, 100]") from None
        for key, item in (bias or {}).items():
            if not key.isascii() or not key.isdigit():
                raise PydanticCustomError("invalid_value", "logit_bias: '{key}' is not a token id",
                                          {"key": key})
            if not -100 <= item <= 100:
                raise PydanticCustomError("invalid_value", "logit_bias: the bias of token {key} is {item}; it must "
                                                           "be in [-100, 100]", {"key": key, "item": item})
        return bias

    @field_validator("service_tier")
    @classmethod
    def _unsupported_tier(cls, value: Any, info) -> Any:
        return refuse_unsupported(value, info.field_name)

    def token_biases(self) -> dict[int, float] | None:
        """logit_bias as the engine takes it (SamplingParams.logit_bias: token id -> bias)."""
        return {int(key): bias for key, bias in self.logit_bias.items()} if self.logit_bias else None

    def sampling_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for engine.SamplingParams (the worker builds it; the API never imports the engine)."""
        return dict(n=self.n, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
                    presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                    repetition_penalty=self.repetition_penalty, seed=self.seed, max_tokens=self.max_tokens,
                    min_tokens=self.min_tokens, stop=self.stop or [], stop_token_ids=self.stop_token_ids or [],
                    ignore_eos=self.ignore_eos, logprobs=self.num_logprobs(),
                    prompt_logprobs=self.num_prompt_logprobs(),
                    structured_outputs=self.structured_output_kwargs(), logit_bias=self.token_biases())

    def num_logprobs(self) -> int | None:
        return None

    def num_prompt_logprobs(self) -> int | None:
        return None


MAX_PROMPTS = 256  # prompts in one completion request: each is an engine request of its own (n choices each)
Prompt = str | list[int] | list[str] | list[list[int]]


class CompletionRequest(SamplingFields):
    # OpenAI's: one prompt (text or token ids) or a list of them; the answer holds each prompt's n choices in turn
    # (choice index = prompt index * n + i), usage summed.
    prompt: Prompt
    max_tokens: Annotated[int, Field(ge=1)] | None = 16  # OpenAI's default for completions
    logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    echo: bool = False  # each choice's text starts with its prompt's text (as vLLM does)
    suffix: SkipJsonSchema[Any] = None  # refused (no insertion), see _unsupported
    best_of: SkipJsonSchema[Any] = None  # only equal to n (each choice is returned), see _best_of

    @field_validator("prompt", mode="wrap")
    @classmethod
    def _prompt_has_tokens(cls, value: Any, handler) -> Prompt:
        # Every problem names `prompt` (not which alternative of the union failed). The engine refuses an empty
        # prompt (nothing to continue from) and negative token ids; refused here, they are the caller's 400 rather
        # than a job failed in the engine. (The ids' upper bound is the model's.)
        try:
            value = handler(value)
        except ValidationError:
            raise PydanticCustomError("invalid_type", "prompt must be a string, a list of token ids, or a list of "
                                                      "either (one prompt each)") from None
        prompts = prompt_list(value)
        if not prompts:
            raise PydanticCustomError("invalid_value", "the prompt is empty")
        if len(prompts) > MAX_PROMPTS:
            raise PydanticCustomError("invalid_value", "at most {limit} prompts in one request",
                                      {"limit": MAX_PROMPTS})
        for index, prompt in enumerate(prompts):
            where = f"prompt {index}" if len(prompts) > 1 else "the prompt"
            if not prompt:
                raise PydanticCustomError("invalid_value", "{where} is empty", {"where": where})
            if isinstance(prompt, list) and min(prompt) < 0:
                raise PydanticCustomError("invalid_value", "token ids are never negative ({where})",
                                          {"where": where})
        return value

    @field_validator("suffix")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        return refuse_unsupported(value, info.field_name)

    @field_validator("best_of")
    @classmethod
    def _best_of(cls, value: Any, info) -> Any:
        # Our choices are all returned: best_of can only be n (vLLM's v1 engine has no best_of either).
        if value is not None and value != info.data.get("n", 1):
            raise PydanticCustomError("unsupported_value", "best_of is not supported: leave it out, or set it to n")
        return value

    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request, in order."""
        return prompt_list(self.prompt)

    def num_logprobs(self) -> int | None:
        return self.logprobs

    def num_prompt_logprobs(self) -> int | None:
        """echo with logprobs scores the prompt too (what lm-evaluation-harness's loglikelihood requests send)."""
        return self.logprobs if self.echo else None


def _json_or_text(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def prompt_list(prompt: Prompt) -> list[str | list[int]]:
    if isinstance(prompt, str) or (prompt and isinstance(prompt[0], int)):
        return [prompt]
    return list(prompt)


# OpenAI fields this server does not support, with the values that mean "not used" (they pass) and why: any other
# value is a 400 naming the field (code `unsupported_parameter`), never a silent 200. The fields are declared on
# the request models (left out of the OpenAPI document), so batch lines and /v1/jobs are checked the same way.
UNSUPPORTED: dict[str, tuple[tuple, str]] = {
    "suffix": ((None, ""), "suffix is not supported: this server does not insert text"),
    "service_tier": ((None, "auto", "default"), "service_tier can only be auto or default here"),
    "audio": ((None,), "audio output is not supported"),
    "modalities": ((None, ["text"]), "modalities other than [\"text\"] are not supported"),
    "prediction": ((None,), "predicted outputs (prediction) are not supported"),
    "web_search_options": ((None,), "web search is not supported"),
    "functions": ((None,), "functions (deprecated) is not supported: use tools"),
    "function_call": ((None,), "function_call (deprecated) is not supported: use tool_choice"),
    "store": ((None, False), "stored completions (store: true) are not supported"),
    "reasoning_effort": ((None,), "reasoning_effort is not supported: the models served here do not reason"),
}


def refuse_unsupported(value: Any, field: str) -> Any:
    passing, why = UNSUPPORTED[field]
    if not any(value == allowed and type(value) is type(allowed) for allowed in passing):
        raise PydanticCustomError("unsupported_parameter", why)
    return value


class ContentPart(BaseModel):
    """One part of a message's content: a text part's `text` must be a string; other kinds pass (and are unread)."""

    model_config = ConfigDict(extra="allow")

    type: StrictStr
    text: StrictStr | None = None

    @model_validator(mode="after")
    def _text_part_has_text(self) -> ContentPart:
        if self.type == "text" and self.text is None:
            raise ValueError("a text part needs its text, a string")
        return self


class FunctionCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: StrictStr
    arguments: StrictStr  # JSON text, as OpenAI sends it


class MessageToolCall(BaseModel):
    """A tool call the assistant made, as a client sends it back in the conversation."""

    model_config = ConfigDict(extra="ignore")

    id: StrictStr
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "developer", "tool"]
    content: str | list[ContentPart] | None = ""
    tool_calls: list[MessageToolCall] | None = None  # an assistant's calls
    tool_call_id: StrictStr | None = None  # a tool's answer: to which call
    name: StrictStr | None = None

    @model_validator(mode="after")
    def _tool_answer_names_its_call(self) -> ChatMessage:
        if self.role == "tool" and not self.tool_call_id:
            raise ValueError("a tool message needs the tool_call_id of the call it answers")
        return self

    def template_fields(self) -> dict[str, Any]:
        """The message as chat templates read it (tool-call arguments as objects, as HF templates expect)."""
        message: dict[str, Any] = {"role": self.role, "content": self.text()}
        if self.tool_calls:
            message["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                "name": c.function.name, "arguments": _json_or_text(c.function.arguments)}} for c in self.tool_calls]
        if self.tool_call_id:
            message["tool_call_id"] = self.tool_call_id
        if self.name:
            message["name"] = self.name
        return message

    def text(self) -> str:
        """Text content; OpenAI also allows a list of parts, of which we take the text ones."""
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content if part.type == "text")
        return self.content or ""


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: Annotated[StrictStr, Field(pattern=r"^[a-zA-Z0-9_-]{1,64}$")]
    description: StrictStr | None = None
    parameters: dict[str, Any] | None = None  # a JSON schema; None: no arguments
    strict: bool | None = None  # arguments always match `parameters`: the grammar holds calls to it


class Tool(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: FunctionDefinition


class NamedToolChoice(BaseModel):
    model_config = ConfigDict(extra="ignore")

    type: Literal["function"]
    function: dict[str, StrictStr]


class ChatCompletionRequest(SamplingFields):
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    logprobs: bool = False
    top_logprobs: Annotated[int, Field(ge=0, le=20)] | None = None
    max_completion_tokens: Annotated[int, Field(ge=1)] | None = None
    # Tool calling (api/tool_calls.py): the template renders the tools; "required" and a named tool are enforced
    # by a grammar, "auto" lets the model choose (and a call it starts is held to the tools' schemas).
    tools: Annotated[list[Tool], Field(max_length=128)] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool = True

    @field_validator("tool_choice")
    @classmethod
    def _tool_choice_fits_tools(cls, choice: Any, info) -> Any:
        tools = info.data.get("tools") or ()
        if isinstance(choice, NamedToolChoice):
            name = choice.function.get("name")
            if name not in {t.function.name for t in tools}:
                raise PydanticCustomError("invalid_value", "tool_choice names '{name}', which is not in tools",
                                          {"name": name})
        elif choice == "required" and not tools:
            raise PydanticCustomError("invalid_value", 'tool_choice "required" needs tools')
        return choice

    @model_validator(mode="after")
    def _tools_or_a_constraint(self) -> ChatCompletionRequest:
        if self.uses_tools() and self.structured_output_kwargs() is not None:
            raise PydanticCustomError("invalid_value", "give either tools (with tool_choice other than none) or "
                                                       "an output constraint (response_format, structured_outputs)")
        return self

    def uses_tools(self) -> bool:
        return bool(self.tools) and self.tool_choice != "none"

    def tool_definitions(self) -> list[dict[str, Any]]:
        """The tools as chat templates and xgrammar take them (OpenAI's shape)."""
        return [t.model_dump(exclude_none=True) for t in self.tools or ()]

    def tool_choice_value(self) -> Any:
        choice = self.tool_choice
        return choice.model_dump() if isinstance(choice, NamedToolChoice) else (choice or "auto")
    # OpenAI chat features not supported here (UNSUPPORTED): a 400 naming the field when used.
    audio: SkipJsonSchema[Any] = None
    modalities: SkipJsonSchema[Any] = None
    prediction: SkipJsonSchema[Any] = None
    web_search_options: SkipJsonSchema[Any] = None
    functions: SkipJsonSchema[Any] = None
    function_call: SkipJsonSchema[Any] = None
    store: SkipJsonSchema[Any] = None
    reasoning_effort: SkipJsonSchema[Any] = None

    @field_validator("audio", "modalities", "prediction", "web_search_options", "functions", "function_call",
                     "store", "reasoning_effort")
    @classmethod
    def _unsupported(cls, value: Any, info) -> Any:
        return refuse_unsupported(value, info.field_name)

    def num_logprobs(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def sampling_kwargs(self) -> dict[str, Any]:
        kwargs = super().sampling_kwargs()
        kwargs["max_tokens"] = self.max_completion_tokens or self.max_tokens
        return kwargs


ENDPOINTS: dict[str, type[SamplingFields]] = {"completions": CompletionRequest,
                                               "chat.completions": ChatCompletionRequest}


class JobCreate(BaseModel):
    """POST /v1/jobs: an OpenAI completion or chat body, plus delivery options."""

    model_config = ConfigDict(extra="allow")

    webhook: str | None = None
    webhook_events: list[Literal["start", "completed"]] = Field(default_factory=lambda: ["completed"])
    metadata: dict[str, str] = Field(default_factory=dict)
    priority: Annotated[int, Field(ge=-100, le=100)] = 0


class CompletionJob(JobCreate, CompletionRequest):
    """POST /v1/jobs with `prompt` (for the OpenAPI document only; the route splits the body itself)."""

    stream: Literal[False] = False  # a job's text is read from /v1/jobs/{id}/events


class ChatJob(JobCreate, ChatCompletionRequest):
    """POST /v1/jobs with `messages` (for the OpenAPI document only)."""

    stream: Literal[False] = False


def raw_json_object(documented_as: Any) -> Any:
    """The type of a request body that reaches its route as the JSON object received (a dict), documented in
    /openapi.json as `documented_as`. For the generation routes: they validate the body themselves (submit's
    checks and messages), and the body as sent is what is stored and handed to the worker."""
    adapter = TypeAdapter(documented_as)

    class RawJsonObject:
        @classmethod
        def __get_pydantic_core_schema__(cls, source: Any, handler: GetCoreSchemaHandler):
            return handler.generate_schema(dict[str, Any])

        @classmethod
        def __get_pydantic_json_schema__(cls, schema: Any, handler: GetJsonSchemaHandler):
            return handler(adapter.core_schema)

    return RawJsonObject


class BatchCreate(BaseModel):
    """POST /v1/batches: OpenAI's fields, plus an optional `webhook` URL told when the batch ends."""

    model_config = ConfigDict(extra="ignore")

    input_file_id: StrictStr
    # What the route accepts (api/batches.py's ENDPOINTS and parse_window), documented; the route checks them
    # itself, with its own messages.
    endpoint: Annotated[StrictStr, Field(json_schema_extra={"enum": ["/v1/completions", "/v1/chat/completions"]})]
    completion_window: Annotated[StrictStr, Field(json_schema_extra={"pattern": "^[0-9]+[smh]$"})] = "24h"
    metadata: Annotated[dict[str, StrictStr], Field(max_length=16)] | None = None
    webhook: StrictStr | None = None


class TokenizeCompletionRequest(BaseModel):
    """POST /tokenize with a prompt (vLLM's): its token ids as a completion would have them."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None  # may be left out while one model is served
    prompt: StrictStr
    add_special_tokens: bool = True  # the BOS a completion's prompt gets
    return_token_strs: bool = False  # also the vocabulary's piece of each token


class TokenizeChatRequest(BaseModel):
    """POST /tokenize with messages (vLLM's): the token ids of the chat's prompt, through the model's template."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: Annotated[list[ChatMessage], Field(min_length=1)]
    add_generation_prompt: bool = True
    add_special_tokens: bool = False  # the template writes the BOS itself
    return_token_strs: bool = False
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the template


class DetokenizeRequest(BaseModel):
    """POST /detokenize (vLLM's): the text of token ids."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    tokens: list[Annotated[int, Field(ge=0)]]


def first_invalid_text(value: Any, path: str = "") -> str | None:
    """Where in a decoded JSON body a string is not valid Unicode (a lone surrogate, which JSON's `\\ud800`
    escape allows), or None: such text cannot be encoded for the tokenizer, Redis or a reply."""
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return path or "body"
    elif isinstance(value, dict):
        for key, item in value.items():
            where = first_invalid_text(key, path) or first_invalid_text(item, f"{path}.{key}" if path else str(key))
            if where:
                return where
    elif isinstance(value, list):
        for index, item in enumerate(value):
            where = first_invalid_text(item, f"{path}.{index}" if path else str(index))
            if where:
                return where
    return None


def error_body(message: str, *, type: str = "invalid_request_error", param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    return {"error": {"message": message, "type": type, "param": param, "code": code}}
