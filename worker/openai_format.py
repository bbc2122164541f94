"""Engine outputs -> OpenAI response bodies (completion and chat completion), as stored in the job record."""
from __future__ import annotations

import codecs
import json
import re
import time
from functools import lru_cache
from itertools import accumulate

from api.openai_compat import SYSTEM_FINGERPRINT, usage_body
from api.openai_compat import finish_reason as openai_finish_reason
from api.streams import join_logprobs
from api.tool_calls import parse as parse_tool_calls
from engine.outputs import CompletionOutput, RequestOutput

LOGPROB_FLOOR = -9999.0  # as vLLM: -inf (a token the sampler excluded) is no JSON number
_BYTE_PIECE = re.compile(r"<0x([0-9A-Fa-f]{2})>")
# Decoder steps whose effect on one token's piece is known (the rest of the tokenizers fall back to decode()).
_KNOWN_DECODERS = {"Sequence", "ByteLevel", "ByteFallback", "Replace", "Fuse", "Strip", "Metaspace"}


def usage(output: RequestOutput | list[RequestOutput]) -> dict:
    """Usage of one engine request, or summed over the requests of one job (a completion with several prompts)."""
    outputs = [output] if isinstance(output, RequestOutput) else output
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return usage_body(prompt, completion, sum(o.num_cached_tokens for o in outputs))


def finish_reason(choice: CompletionOutput) -> str | None:
    return openai_finish_reason(choice.finish_reason)


class TokenText:
    """What each generated token stands for in the output: its bytes, and its text for logprobs.

    Neither the vocabulary's piece ("▁L", "<0x53>" for SentencePiece, "ĠL" for byte-level BPE) nor decoding the token
    alone will do: SentencePiece's decoder drops the leading space of the first token it decodes, and a byte token
    decodes to U+FFFD. So a token's bytes come from its piece through the tokenizer's own decoder rules (the
    byte-level alphabet, byte fallback, "▁" -> " "), and the bytes of a choice's tokens concatenate to its text's
    bytes (special tokens aside: skipped in the text). Its text is those bytes as UTF-8, or, for a token that is part
    of a character, "bytes:\\xe2\\x80" (OpenAI's spelling for such tokens)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        steps = _decoder_steps(tokenizer)
        kinds = {step.get("type") for step in steps}
        self._known = bool(kinds) and kinds <= _KNOWN_DECODERS
        self._byte_level = {char: byte for byte, char in _bytes_to_unicode().items()} if "ByteLevel" in kinds else None
        self._byte_fallback = "ByteFallback" in kinds
        self._replace = [(step["pattern"]["String"], step["content"]) for step in steps
                         if step.get("type") == "Replace" and "String" in (step.get("pattern") or {})]
        self._replace += [(step.get("replacement", "\u2581"), " ") for step in steps if step.get("type") == "Metaspace"]
        decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
        self._added = {token_id: token.content for token_id, token in decoder.items()}
        self.special = frozenset(getattr(tokenizer, "all_special_ids", None) or ()) | {
            token_id for token_id, token in decoder.items() if getattr(token, "special", False)}
        self._cache: dict[int, bytes] = {}

    def bytes_of(self, token_id: int) -> bytes:
        cached = self._cache.get(token_id)
        if cached is None:
            cached = self._cache[token_id] = self._bytes(token_id)
        return cached

    def text_of(self, token_id: int) -> str:
        return as_text(self.bytes_of(token_id))

    def char_counts(self, token_ids: list[int]) -> list[int]:
        """How many characters of the decoded text each token completes (0 for the first bytes of a character
        split over tokens, and for special tokens: skipped in the text), as the tokenizer's decoder writes them:
        byte-fallback tokens are decoded run by run, a run that is not valid UTF-8 giving one U+FFFD per token;
        other tokenizers decode their bytes as a whole, an invalid sequence giving one U+FFFD."""
        return CharCounter(self).feed(token_ids, end=True)

    def _is_byte_piece(self, token_id: int) -> bool:
        return token_id not in self._added and _BYTE_PIECE.fullmatch(
            self.tokenizer.convert_ids_to_tokens(token_id) or "") is not None

    def _bytes(self, token_id: int) -> bytes:
        if token_id in self._added:  # added tokens are stored as their text, in no alphabet
            return self._added[token_id].encode()
        piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if piece is None:  # past the vocabulary
            return b""
        if not self._known:
            return self.tokenizer.decode([token_id], skip_special_tokens=False).encode()
        if self._byte_level is not None:
            if all(char in self._byte_level for char in piece):
                return bytes(self._byte_level[char] for char in piece)
            return piece.encode()
        match = _BYTE_PIECE.fullmatch(piece) if self._byte_fallback else None
        if match:
            return bytes([int(match[1], 16)])
        for old, new in self._replace:
            piece = piece.replace(old, new)
        return piece.encode()


class CharCounter:
    """TokenText.char_counts of one choice's tokens fed a few at a time (a stream's steps): the same counts, each
    given once it is known. A byte-fallback token's count is known only when its run ends (a run is decoded as a
    whole: a later byte can make it valid UTF-8), so the tokens of a run still open wait for the next feed."""

    def __init__(self, texts: TokenText) -> None:
        self.texts = texts
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")  # holds a character's first bytes
        self._run: list[bytes] = []  # the open run of byte tokens

    def feed(self, token_ids: list[int], end: bool = False) -> list[int]:
        """The counts of the tokens waiting from earlier feeds, then of `token_ids`, as far as they are known; with
        `end` (no token follows), all of them."""
        texts, counts = self.texts, []
        for token_id in token_ids:
            if token_id in texts.special:
                counts += self._end_run()
                counts.append(0)
            elif texts._byte_fallback and texts._is_byte_piece(token_id):
                self._run.append(texts.bytes_of(token_id))
            else:
                counts += self._end_run()
                counts.append(len(self._decoder.decode(texts.bytes_of(token_id))))
        if end:
            counts += self._end_run()
        return counts

    def _end_run(self) -> list[int]:
        run, self._run = self._run, []
        if not run:
            return []
        try:
            b"".join(run).decode("utf-8")
        except UnicodeDecodeError:
            return [1] * len(run)
        decoder = codecs.getincrementaldecoder("utf-8")()
        return [len(decoder.decode(data)) for data in run]


@lru_cache(maxsize=4)
def token_text(tokenizer) -> TokenText:
    return TokenText(tokenizer)


def as_text(data: bytes) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{byte:02x}" for byte in data)


def _decoder_steps(tokenizer) -> list[dict]:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return [decoder, *decoder.get("decoders", [])] if decoder else []


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: byte -> the character that spells it in the vocabulary."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\u00a1"), ord("\u00ac") + 1),
                 *range(ord("\u00ae"), ord("\u00ff") + 1)]
    chars, extra = {}, 0
    for byte in range(256):
        if byte in printable:
            chars[byte] = chr(byte)
        else:
            chars[byte] = chr(256 + extra)
            extra += 1
    return chars


def _logprob(value: float) -> float:
    return max(float(value), LOGPROB_FLOOR)


def completion_logprobs(choice: CompletionOutput, texts: TokenText, offset: int = 0, start: int = 0,
                        counts: list[int] | None = None) -> dict | None:
    """Completions' logprobs: each token's text, its log-prob, the top ones keyed by their text, and where each
    token starts in the choice's text (characters; `offset` is where the generated text starts, after an echo).
    A stream's chunk (LogprobStream) has only the tokens from `start` on, one per count of `counts` (their
    character counts, from the choice's CharCounter), `offset` then being where token `start` starts."""
    if choice.logprobs is None:
        return None
    end = None if counts is None else start + len(counts)
    token_ids, entries = choice.token_ids[start:end], choice.logprobs[start:end]
    counts = texts.char_counts(token_ids) if counts is None else counts
    return {"tokens": [texts.text_of(t) for t in token_ids], "token_logprobs": [_logprob(entry[t]) for entry, t in zip(entries, token_ids)],
            "top_logprobs": [_top_by_text(entry, texts) for entry in entries],
            "text_offset": _offsets(counts, offset)}


def echo_logprobs(output: RequestOutput, texts: TokenText) -> dict | None:
    """Completions' logprobs of an echoed prompt (echo with logprobs, SamplingParams.prompt_logprobs): each prompt
    token scored given the ones before it; the first has nothing before it, so its log-prob is null (as OpenAI's
    and vLLM's). Text offsets count from the start of the echoed text."""
    scores = output.prompt_logprobs
    if scores is None:
        return None
    ids = output.prompt_token_ids
    return {"tokens": [texts.text_of(t) for t in ids],
            "token_logprobs": [None if entry is None else _logprob(entry[t]) for entry, t in zip(scores, ids)],
            "top_logprobs": [None if entry is None else _top_by_text(entry, texts) for entry in scores],
            "text_offset": _offsets(texts.char_counts(ids), 0)}


def _offsets(counts: list[int], start: int) -> list[int]:
    """Where each token starts in the text, from the characters each one adds and where the first starts."""
    return list(accumulate(counts, initial=start))[:-1]


def _top_by_text(entry: dict[int, float], texts: TokenText) -> dict[str, float]:
    """Completions' top_logprobs of one token: keyed by text, the likelier of two tokens with one text kept."""
    alternatives: dict[str, float] = {}
    for alternative, logprob in sorted(entry.items(), key=lambda kv: kv[1], reverse=True):
        alternatives.setdefault(texts.text_of(alternative), _logprob(logprob))
    return alternatives


def chat_logprobs(choice: CompletionOutput, texts: TokenText, top: int, start: int = 0,
                  end: int | None = None) -> dict | None:
    """Chat's logprobs of the choice's tokens [start:end] (a stream's chunk has some; a body all)."""
    if choice.logprobs is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        data = texts.bytes_of(token_id)
        return {"token": as_text(data), "logprob": _logprob(logprob), "bytes": list(data)}

    content = []
    for entry, token_id in zip(choice.logprobs[start:end], choice.token_ids[start:end]):
        alternatives = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:top]
        content.append(item(token_id, entry[token_id]) | {"top_logprobs": [item(i, lp) for i, lp in alternatives]})
    return {"content": content, "refusal": None}


class LogprobStream:
    """One streamed choice's logprobs, chunk by chunk, formatted as its body's are (the chunks' lists concatenate
    to the body's, text offsets counted from the start of the choice's text). Fed every output of the choice, in
    order: an output's own tokens are the `delta_token_ids` after those fed before (its `token_ids` and `logprobs`
    may be live lists that already hold later steps' tokens)."""

    def __init__(self, tokenizer, chat: bool, top: int, offset: int = 0) -> None:
        self.texts = token_text(tokenizer)
        self.chat, self.top = chat, top
        self.fed = 0  # tokens of the outputs fed so far
        self.sent = 0  # tokens formatted so far (completions: less while a byte run is open, see CharCounter)
        self.offset = offset  # completions: where token `sent` starts in the choice's text
        self.counter = None if chat else CharCounter(self.texts)

    def take(self, choice: CompletionOutput) -> dict | None:
        """The logprobs of the tokens this output adds (and of any waiting); None if none (or it asked for none)."""
        start, self.fed = self.fed, self.fed + len(choice.delta_token_ids)
        if choice.logprobs is None:
            return None
        before = self.sent
        if self.counter is None:
            body = chat_logprobs(choice, self.texts, self.top, start, self.fed)
            self.sent = self.fed
        else:
            counts = self.counter.feed(choice.token_ids[start:self.fed], end=choice.finished)
            body = completion_logprobs(choice, self.texts, self.offset, self.sent, counts)
            self.sent += len(counts)
            self.offset += sum(counts)
        return body if self.sent > before else None


def echo_texts(prompts: list, tokenizer) -> list[str]:
    """Completions' echo: each prompt's text as given, a token-id prompt decoded."""
    return [p if isinstance(p, str) else tokenizer.decode(p, skip_special_tokens=True) for p in prompts]


def completion_body(job_id: str, model: str, output: RequestOutput | list[RequestOutput], tokenizer, *, n: int = 1,
                    echo: list[str] | None = None, created: int | None = None) -> dict:
    """One body for a job's engine requests (one per prompt, in order): prompt k's choice i is choice k * n + i,
    its text after the prompt's own with `echo`."""
    outputs = [output] if isinstance(output, RequestOutput) else output
    texts = token_text(tokenizer)
    choices = []
    for k, part in enumerate(outputs):
        prefix = echo[k] if echo else ""
        prompt_scores = echo_logprobs(part, texts) if echo else None
        choices += [{"index": k * n + c.index, "text": prefix + c.text,
                     "logprobs": join_logprobs(prompt_scores, completion_logprobs(c, texts, len(prefix))),
                     "finish_reason": finish_reason(c)}
                    for c in part.outputs]
    return {"id": f"cmpl-{job_id}", "object": "text_completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT, "choices": choices, "usage": usage(outputs)}


def chat_body(job_id: str, model: str, output: RequestOutput, tokenizer, top_logprobs: int,
              created: int | None = None, tool_parser: str | None = None) -> dict:
    """`tool_parser`: the request had tools, and its replies' tool calls are parsed out of the text."""
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": created or int(time.time()),
            "model": model, "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [chat_choice(c, tokenizer, top_logprobs, tool_parser) for c in output.outputs],
            "usage": usage(output)}


def chat_choice(c: CompletionOutput, tokenizer, top_logprobs: int, tool_parser: str | None) -> dict:
    message: dict = {"role": "assistant", "content": c.text}
    reason = finish_reason(c)
    if tool_parser is not None:
        content, calls = parse_tool_calls(tool_parser, c.text)
        if calls:
            message = {"role": "assistant", "content": content, "tool_calls": calls}
            reason = "tool_calls" if reason == "stop" else reason
    return {"index": c.index, "message": message, "logprobs": chat_logprobs(c, token_text(tokenizer), top_logprobs),
            "finish_reason": reason}
