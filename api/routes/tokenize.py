"""vLLM's /tokenize and /detokenize, from the tokenizer each model's workers publish (api/tokenization.py): they
answer without a worker's help, as long as one has ever served the model."""
from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Body, Request

from api.deps import APIError, OwnerDep, StoreDep
from api.responses import DetokenizeResponse, TokenizeResponse, errors, ok
from api.schemas import DetokenizeRequest, TokenizeChatRequest, TokenizeCompletionRequest, raw_json_object
from api.store import JobStore
from api.submit import parse_body
from api.tokenization import ModelTokenizer, TokenizerCache

router = APIRouter(tags=["tokenize"])

TokenizeBody = raw_json_object(TokenizeCompletionRequest | TokenizeChatRequest)
DetokenizeBody = raw_json_object(DetokenizeRequest)
ERRORS = errors(400, 401, 404, 413, 503)


@router.post("/tokenize", response_model=None, responses=ok(TokenizeResponse) | ERRORS)
def tokenize(request: Request, store: StoreDep, _: OwnerDep, body: TokenizeBody = Body(...)) -> dict:
    """A prompt's token ids (`prompt`), or a chat's (`messages`, through the model's chat template)."""
    chat = isinstance(body, dict) and "messages" in body
    parsed = parse_body(TokenizeChatRequest if chat else TokenizeCompletionRequest, body)
    tokenizer, max_model_len = _tokenizer(request.app.state.tokenizers, store, parsed.model)
    if chat:
        messages = [{"role": m.role, "content": m.text()} for m in parsed.messages]
        try:
            text = tokenizer.render_chat(messages, parsed.add_generation_prompt, **(parsed.chat_template_kwargs or {}))
        except ValueError as exc:
            raise APIError(400, str(exc), param="messages") from None
    else:
        text = parsed.prompt
    tokens = tokenizer.encode(text, parsed.add_special_tokens)
    return {"count": len(tokens), "max_model_len": max_model_len, "tokens": tokens,
            "token_strs": tokenizer.pieces(tokens) if parsed.return_token_strs else None}


@router.post("/detokenize", response_model=None, responses=ok(DetokenizeResponse) | ERRORS)
def detokenize(request: Request, store: StoreDep, _: OwnerDep, body: DetokenizeBody = Body(...)) -> dict:
    """The text of token ids (special tokens kept, as vLLM's)."""
    parsed = parse_body(DetokenizeRequest, body)
    tokenizer, _ = _tokenizer(request.app.state.tokenizers, store, parsed.model)
    if any(token >= tokenizer.vocab_size for token in parsed.tokens):
        raise APIError(400, f"token ids must be below the vocabulary's size, {tokenizer.vocab_size}",
                       param="tokens")
    return {"prompt": tokenizer.decode(parsed.tokens)}


def _tokenizer(cache: TokenizerCache, store: JobStore, model: str | None) -> tuple[ModelTokenizer, int]:
    """The model's tokenizer and context length (its live workers', else what was published)."""
    models, known = store.registry.snapshot()
    if model is None:
        if len(models) != 1:
            raise APIError(400, "model is required when more (or fewer) than one model is served", param="model")
        model = next(iter(models))
    tokenizer = cache.get(model)
    if tokenizer is None:
        if model in known:  # a worker of a build that publishes no tokenizer, or one without a fast tokenizer
            raise APIError(503, f"no tokenizer of {model!r} is published yet; try again later",
                           type="service_unavailable", code="no_tokenizer", headers={"Retry-After": "5"})
        raise APIError(404, f"The model '{model}' does not exist", param="model", code="model_not_found")
    workers: list[dict[str, Any]] = models.get(model) or []
    max_model_len = min((int(w.get("max_model_len", 0)) for w in workers), default=0) or tokenizer.max_model_len
    return tokenizer, max_model_len
