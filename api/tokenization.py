"""The models' tokenizers for the API's /tokenize and /detokenize (vLLM's), without torch, the engine or model files.

Why through Redis: the API process holds no model files (it may run on another host than every worker) and never
imports torch or the engine, yet its token ids must be exactly the worker's. So each worker publishes its tokenizer
under its model when it first announces itself (worker/runtime.py): the fast tokenizer's `tokenizer.json` text (all
that transformers' tokenizer runs: normalizer, pre-tokenizer, model, the post-processor that adds BOS), its chat
template and special tokens. The API loads it with the `tokenizers` package (Rust, no torch), renders chat
templates with jinja2 in the sandbox transformers uses, and keeps it per model, checking a digest at each use so
that a worker with another tokenizer for the model is picked up. Asking a worker instead (a job through the queue)
would cost a queue round trip and a task thread per call, and could not answer while the model's workers are busy
or gone; shipping model files to API hosts would be a second deployment path to keep in step.

Key: {p}:tokenizer:{model} (hash: digest, tokenizer_json, chat_template, special_tokens (JSON), max_model_len).
"""
from __future__ import annotations

import hashlib
import json
import logging
import threading
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import redis

log = logging.getLogger(__name__)


def tokenizer_key(prefix: str, model: str) -> str:
    return f"{prefix}:tokenizer:{model}"


def publish_tokenizer(r: redis.Redis, prefix: str, model: str, tokenizer, max_model_len: int) -> bool:
    """The worker's side: publish `tokenizer` (a transformers tokenizer) under `model`, unless the same one is there
    already. False if it has no fast tokenizer behind it (nothing the API could load)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        log.warning("model %s has no fast tokenizer: /tokenize and /detokenize cannot serve it", model)
        return False
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates: the default one is what chats use
        template = template.get("default")
    special = {name: value for name, value in (tokenizer.special_tokens_map or {}).items() if isinstance(value, str)}
    fields = {"tokenizer_json": backend.to_str(), "chat_template": template or "",
              "special_tokens": json.dumps(special, sort_keys=True), "max_model_len": str(int(max_model_len))}
    digest = hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()
    key = tokenizer_key(prefix, model)
    if r.hget(key, "digest") != digest:  # a restart of the same worker rewrites nothing
        r.hset(key, mapping={**fields, "digest": digest})
    return True


@dataclass(eq=False)
class ModelTokenizer:
    """One model's published tokenizer, loaded in the API."""

    digest: str
    tokenizer: Any  # tokenizers.Tokenizer
    chat_template: str | None
    special_tokens: dict[str, str]
    max_model_len: int
    _template: Any = field(default=None, repr=False)

    @classmethod
    def load(cls, fields: dict[str, str]) -> ModelTokenizer:
        from tokenizers import Tokenizer

        return cls(digest=fields["digest"], tokenizer=Tokenizer.from_str(fields["tokenizer_json"]),
                   chat_template=fields.get("chat_template") or None,
                   special_tokens=json.loads(fields.get("special_tokens") or "{}"),
                   max_model_len=int(fields.get("max_model_len") or 0))

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, token_ids: list[int]) -> str:
        return self.tokenizer.decode(token_ids, skip_special_tokens=False)

    def pieces(self, token_ids: list[int]) -> list[str]:
        return [self.tokenizer.id_to_token(token_id) or "" for token_id in token_ids]

    def render_chat(self, messages: list[dict], add_generation_prompt: bool, **kwargs: Any) -> str:
        """The chat template's text, as transformers' apply_chat_template renders it (special tokens as template
        variables, caller's kwargs over them). ValueError if there is no template or it refuses the messages."""
        if self.chat_template is None:
            raise ValueError("the model has no chat template; tokenize a prompt instead")
        if self._template is None:
            self._template = _environment().from_string(self.chat_template)
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         **{**self.special_tokens, **kwargs})
        except Exception as exc:  # noqa: BLE001 - jinja raises for e.g. non-alternating roles: the caller's error
            raise ValueError(f"messages do not fit the model's chat template: {exc}") from exc


class TokenizerCache:
    """The API's side: each model's published tokenizer, loaded once per digest."""

    def __init__(self, r: redis.Redis, prefix: str) -> None:
        self.r = r
        self.prefix = prefix
        self._loaded: dict[str, ModelTokenizer] = {}
        self._lock = threading.Lock()  # one load per model at a time (a large tokenizer takes a moment)

    def get(self, model: str) -> ModelTokenizer | None:
        """The model's tokenizer, or None if no worker ever published one."""
        key = tokenizer_key(self.prefix, model)
        digest = self.r.hget(key, "digest")
        if digest is None:
            return None
        loaded = self._loaded.get(model)
        if loaded is not None and loaded.digest == digest:
            return loaded
        with self._lock:
            loaded = self._loaded.get(model)
            if loaded is None or loaded.digest != digest:
                fields = self.r.hgetall(key)
                if not fields.get("digest"):
                    return None
                loaded = self._loaded[model] = ModelTokenizer.load(fields)
        return loaded


def _environment():
    """jinja2 as transformers sets it up for chat templates: sandboxed, trim/lstrip blocks, loop controls, its
    globals (raise_exception, strftime_now) and tojson without HTML escaping."""
    import jinja2
    from jinja2 import nodes
    from jinja2.ext import Extension
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (transformers marks assistant text with it): rendered as is."""

        tags = {"generation"}

        def parse(self, parser):
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

        def _render(self, caller):
            return caller()

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                          sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[Generation, jinja2.ext.loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env
