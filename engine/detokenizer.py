"""Incremental detokenization of generated tokens, and stop strings.

Decoding token by token is wrong for SentencePiece (a piece's leading "▁" is dropped when it is the first token
decoded) and for byte-fallback / byte-level tokens (one character may be split over several tokens). So, as vLLM
does, each step decodes a short window of tokens that starts before the new ones, and the new text is the
difference between the window decoded with and without them. The window only ever holds the last few tokens, so
a step costs the same at token 10 as at token 10,000.
"""
from __future__ import annotations

# Prompt tokens decoded before the first generated one (vLLM's INITIAL_INCREMENTAL_DETOKENIZATION_OFFSET).
_PROMPT_CONTEXT = 5
# A UTF-8 character has at most 4 bytes, so at most 4 tokens: a replacement character still at the end after more
# tokens than that is not an incomplete character but real output (the model produced invalid bytes).
_MAX_PENDING = 4
# Bound on the window when tokens keep decoding to nothing (a pathological model output).
_MAX_WINDOW = 64
_REPLACEMENT = "\ufffd"


class IncrementalDetokenizer:
    """Turns one request's generated token ids into text, a piece at a time, and watches for stop strings.

    `text` only ever grows by appending (until a stop string cuts it), so handed-out deltas never need revising.
    """

    def __init__(self, tokenizer, prompt_token_ids: list[int], stop: list[str], skip_special_tokens: bool = True):
        if isinstance(stop, str):
            stop = [stop]
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError("stop must be a list of non-empty strings")
        self._tokenizer = tokenizer
        self._skip_special = skip_special_tokens
        self._stop = list(dict.fromkeys(stop))
        self._max_stop = max((len(s) for s in self._stop), default=0)
        # Skipped special tokens decode to nothing: keeping them out of the window keeps it short and makes sure the
        # token before a word is a real one (a window that starts with a skipped token would lose the word's space).
        self._skipped = _special_ids(tokenizer) if skip_special_tokens else frozenset()
        # Token ids from the window start; _window[:_read] decodes to _prefix_text, which is already accounted for.
        self._window = [t for t in prompt_token_ids if t not in self._skipped][-_PROMPT_CONTEXT:]
        self._read = len(self._window)
        self._prefix_text = self._decode(self._window)
        # Characters after _prefix_text already emitted while waiting for an incomplete character to finish.
        self._emitted = 0
        self._sent_parts: list[str] = []
        self._unsent = ""  # in `text`, not yet handed out by take_delta
        self._stop_reason: str | None = None
        self._finished = False

    @property
    def text(self) -> str:
        """The output text so far (without a stop string and what follows it)."""
        return "".join(self._sent_parts) + self._unsent

    @property
    def stop_reason(self) -> str | None:
        """The stop string that ended the text, if any."""
        return self._stop_reason

    def add_tokens(self, token_ids: list[int]) -> str | None:
        """Append generated tokens; return the stop string if one now appears in the output text (the text is then
        cut before it), else None. Tokens added after a stop string or after the final take_delta are ignored."""
        if self._stop_reason is not None or self._finished:
            return None
        kept = [t for t in token_ids if t not in self._skipped]
        if not kept:
            return None
        self._window.extend(kept)
        return self._append(self._decode_new(force=False))

    def take_delta(self, finished: bool) -> str:
        """Text not yet handed out. While not finished it holds back a trailing part that could still become a stop
        string (an incomplete multi-byte character is never in `text` yet); when finished it flushes everything.
        Concatenating all deltas always equals the final `text`."""
        if finished and not self._finished:
            if self._stop_reason is None:
                # Whatever waited for more bytes is final now: decode it as it is.
                self._append(self._decode_new(force=True))
            self._finished = True
        hold = 0
        if not self._finished and self._stop_reason is None:
            hold = self._stop_prefix_len(self._unsent)
        cut = len(self._unsent) - hold
        delta, self._unsent = self._unsent[:cut], self._unsent[cut:]
        if delta:
            self._sent_parts.append(delta)
        return delta

    # ---- internals ----

    def _decode(self, token_ids: list[int]) -> str:
        # No clean-up: it rewrites text around punctuation, so a window's text would not extend its prefix's text.
        return self._tokenizer.decode(token_ids, skip_special_tokens=self._skip_special,
                                      clean_up_tokenization_spaces=False)

    def _decode_new(self, force: bool) -> str:
        """Text of the window's tokens after the already accounted-for ones, minus what was already emitted."""
        full = self._decode(self._window)
        tail = full[len(self._prefix_text):]
        pending = len(self._window) - self._read
        if not force and full.endswith(_REPLACEMENT) and pending <= _MAX_PENDING:
            # Probably a character split over byte tokens: emit what precedes it, keep the tokens pending.
            ready = tail.rstrip(_REPLACEMENT)
            piece = ready[self._emitted:]
            self._emitted = max(self._emitted, len(ready))
            return piece
        piece = tail[self._emitted:]
        # Advance only once the new tokens produced text: the next window must start at a token that decodes to
        # something, or a decoder that strips the first token's leading space would eat the next word's space.
        if tail or len(self._window) > _MAX_WINDOW:
            self._window = self._window[self._read:]
            self._read = len(self._window)
            self._prefix_text = self._decode(self._window)
            self._emitted = 0
        return piece

    def _append(self, piece: str) -> str | None:
        if not piece:
            return None
        start = max(0, len(self._unsent) - self._max_stop + 1)
        self._unsent += piece
        if not self._stop:
            return None
        # Only the new text and the few characters before it can hold a new match; the earliest match wins.
        best: tuple[int, str] | None = None
        for stop in self._stop:
            index = self._unsent.find(stop, start)
            if index != -1 and (best is None or index < best[0]):
                best = (index, stop)
        if best is None:
            return None
        self._unsent = self._unsent[:best[0]]
        self._stop_reason = best[1]
        return best[1]

    def _stop_prefix_len(self, text: str) -> int:
        """Length of the longest end of text that is the start of a stop string (it may still become one)."""
        for length in range(min(len(text), self._max_stop - 1), 0, -1):
            suffix = text[-length:]
            if any(stop.startswith(suffix) for stop in self._stop):
                return length
        return 0


def _special_ids(tokenizer) -> frozenset[int]:
    """Ids that decode(..., skip_special_tokens=True) drops."""
    ids = set(getattr(tokenizer, "all_special_ids", None) or [])
    decoder = getattr(tokenizer, "added_tokens_decoder", None) or {}
    ids.update(i for i, token in decoder.items() if getattr(token, "special", False))
    return frozenset(ids)
