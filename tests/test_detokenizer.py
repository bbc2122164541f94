"""IncrementalDetokenizer against whole-sequence decoding with the demo model's (SentencePiece, byte fallback)
tokenizer."""
from __future__ import annotations

import random
from pathlib import Path

import pytest

from engine.detokenizer import IncrementalDetokenizer

PROMPTS = ["Hello", "The answer is", "def main():\n   ", "x =", "a b c ", "Line one\n"]
CONTINUATIONS = [
    " world, and more words here.",
    " 42.",
    " café Größe naïve",
    " 日本語 and 中文 text",
    " emoji 😀🚀 then 👍🏽 and ❤️ end",
    "\n\n    return 0\n",
    "  two spaces, then\ttab",
    "😀",
    "x",
    " 12345 67",
]


@pytest.fixture(scope="module")
def tok(demo_model_dir: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(demo_model_dir, local_files_only=True)


def split_encode(tok, prompt: str, continuation: str) -> tuple[list[int], list[int]]:
    """Prompt ids (with BOS) and the ids that follow them when prompt + continuation is encoded as one text."""
    prompt_ids = tok.encode(prompt)
    ids = tok.encode(prompt + continuation)
    # Merges may cross the boundary: back off to the longest common prefix.
    n = 0
    while n < min(len(ids), len(prompt_ids)) and ids[n] == prompt_ids[n]:
        n += 1
    return ids[:n], ids[n:]


def reference(tok, prompt_ids: list[int], output_ids: list[int], skip: bool = True) -> str:
    full = tok.decode(prompt_ids + output_ids, skip_special_tokens=skip)
    return full[len(tok.decode(prompt_ids, skip_special_tokens=skip)):]


def stream(tok, prompt_ids: list[int], output_ids: list[int], stop: list[str] | None = None,
           skip: bool = True) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed tokens one at a time as the engine does, taking a delta after each; returns the deltas."""
    detok = IncrementalDetokenizer(tok, prompt_ids, stop or [], skip_special_tokens=skip)
    deltas, stopped = [], None
    for i, token in enumerate(output_ids):
        stopped = detok.add_tokens([token])
        last = stopped is not None or i == len(output_ids) - 1
        deltas.append(detok.take_delta(finished=last))
        if stopped is not None:
            break
    if not output_ids:
        deltas.append(detok.take_delta(finished=True))
    return detok, deltas, stopped


@pytest.mark.parametrize("prompt", PROMPTS)
def test_deltas_match_whole_decoding(tok, prompt: str):
    for continuation in CONTINUATIONS:
        prompt_ids, output_ids = split_encode(tok, prompt, continuation)
        detok, deltas, stopped = stream(tok, prompt_ids, output_ids)
        assert stopped is None
        expected = reference(tok, prompt_ids, output_ids)
        assert "".join(deltas) == detok.text == expected, (prompt, continuation)
        assert all("\ufffd" not in d for d in deltas), deltas


def test_leading_space_of_first_output_word_is_kept(tok):
    prompt_ids, output_ids = split_encode(tok, "Hello", " world")
    assert tok.convert_ids_to_tokens(output_ids)[0].startswith("▁")
    _, deltas, _ = stream(tok, prompt_ids, output_ids)
    assert deltas[0].startswith(" ")
    # A bare BOS prompt: nothing precedes the first word, so (as whole decoding does) no leading space.
    detok, _, _ = stream(tok, [tok.bos_token_id], output_ids)
    assert detok.text == reference(tok, [tok.bos_token_id], output_ids) == tok.decode(output_ids)


def test_emoji_split_over_byte_tokens_is_held_until_complete(tok):
    prompt_ids = tok.encode("Smile:")
    output_ids = tok.encode("Smile: 😀", add_special_tokens=False)[len(prompt_ids) - 1:]
    pieces = tok.convert_ids_to_tokens(output_ids)
    assert pieces[-4:] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    detok = IncrementalDetokenizer(tok, prompt_ids, [])
    deltas = []
    for token in output_ids:
        detok.add_tokens([token])
        deltas.append(detok.take_delta(finished=False))
    assert deltas[-4:-1] == ["", "", ""] and deltas[-1] == "😀"
    assert "".join(deltas) == " 😀"


def test_random_valid_token_sequences(tok):
    """Random sequences of ordinary pieces and whole UTF-8 characters as byte tokens."""
    rng = random.Random(0)
    vocab = tok.convert_ids_to_tokens(list(range(len(tok))))
    ordinary = [i for i, p in enumerate(vocab) if i > 2 and not p.startswith("<0x")]
    chars = [[tok.convert_tokens_to_ids(f"<0x{b:02X}>") for b in c.encode()] for c in "é日😀€ж"]
    for _ in range(40):
        output: list[int] = []
        for _ in range(rng.randint(1, 30)):
            output += rng.choice(chars) if rng.random() < 0.25 else [rng.choice(ordinary)]
        prompt_ids = tok.encode(rng.choice(PROMPTS))
        detok, deltas, _ = stream(tok, prompt_ids, output)
        assert "".join(deltas) == detok.text == reference(tok, prompt_ids, output)
        assert all("\ufffd" not in d for d in deltas)


def test_invalid_bytes_are_flushed_as_replacement_characters(tok):
    """A model may emit bytes that never form a character: they show up, as in whole decoding, at the latest when
    the request finishes."""
    prompt_ids = tok.encode("Bytes")
    lone = tok.convert_tokens_to_ids("<0xE6>")
    detok, deltas, _ = stream(tok, prompt_ids, [lone])
    assert deltas == ["\ufffd"] and detok.text == reference(tok, prompt_ids, [lone])
    word = tok.encode("Bytes ok", add_special_tokens=False)[-1]
    output = [lone, lone, word] + [lone] * 7
    detok, deltas, _ = stream(tok, prompt_ids, output)
    assert "".join(deltas) == detok.text == reference(tok, prompt_ids, output)


def test_special_tokens(tok):
    prompt_ids, output_ids = split_encode(tok, "Hello", " world")
    output_ids = output_ids + [tok.eos_token_id]
    detok, _, _ = stream(tok, prompt_ids, output_ids)
    assert detok.text == reference(tok, prompt_ids, output_ids) and "</s>" not in detok.text
    detok, _, _ = stream(tok, prompt_ids, output_ids, skip=False)
    assert detok.text == reference(tok, prompt_ids, output_ids, skip=False) and detok.text.endswith("</s>")
    # An EOS inside the output (ignore_eos) must not eat the next word's leading space.
    middle = output_ids[:-1] + [tok.eos_token_id] + tok.encode("a b", add_special_tokens=False)[-1:]
    detok, _, _ = stream(tok, prompt_ids, middle)
    assert detok.text == reference(tok, prompt_ids, middle) and detok.text.endswith(" b")


@pytest.mark.parametrize("continuation, stop, expected", [
    (" world, and more words", ["words"], " world, and more "),  # multi-token stop string
    (" world, and more words", [","], " world"),  # single character, mid-token
    (" world, and more words", [" world"], ""),  # at the very start of the output
    (" world, and more words", ["orl"], " w"),  # starts and ends inside tokens
    (" world, and more words", ["zzz", "more", "and"], " world, "),  # the earliest match wins
    (" café 日本 done", ["日"], " café "),  # a character made of byte tokens
    (" café 日本 done", ["本 d"], " café 日"),
    (" line\n\nnext", ["\n\n"], " line"),
])
def test_stop_strings(tok, continuation: str, stop: list[str], expected: str):
    prompt_ids, output_ids = split_encode(tok, "Hello", continuation)
    detok, deltas, stopped = stream(tok, prompt_ids, output_ids, stop=stop)
    assert stopped is not None and stopped in stop
    assert detok.text == "".join(deltas) == expected
    assert detok.stop_reason == stopped
    # Later tokens are ignored.
    assert detok.add_tokens(output_ids[-1:]) is None and detok.text == expected


def test_no_stop_when_absent(tok):
    prompt_ids, output_ids = split_encode(tok, "Hello", " world, and more words")
    detok, deltas, stopped = stream(tok, prompt_ids, output_ids, stop=["xyz", "worlds"])
    assert stopped is None and "".join(deltas) == detok.text == " world, and more words"


def test_text_that_may_become_a_stop_string_is_held_back_then_flushed(tok):
    prompt_ids, output_ids = split_encode(tok, "Hello", " world, and more wo")
    detok = IncrementalDetokenizer(tok, prompt_ids, ["words!", "and more?"])
    sent = ""
    for token in output_ids:
        assert detok.add_tokens([token]) is None
        sent += detok.take_delta(finished=False)
        assert detok.text.startswith(sent)
    assert detok.text == " world, and more wo"
    assert sent == " world, and more "  # "wo" might still become "words!"
    assert detok.take_delta(finished=True) == "wo"
    assert detok.take_delta(finished=True) == ""


def test_held_back_text_is_released_when_it_cannot_match(tok):
    prompt_ids, output_ids = split_encode(tok, "Hello", " world")
    detok = IncrementalDetokenizer(tok, prompt_ids, ["world peace"])
    for token in output_ids:
        detok.add_tokens([token])
    assert detok.take_delta(finished=False) == " "  # "world" may still become "world peace"
    detok.add_tokens(tok.encode("world x", add_special_tokens=False)[-1:])
    assert detok.take_delta(finished=False) == "world x"


def test_stop_found_without_intermediate_deltas(tok):
    """The stop search is limited to the end of the text even when take_delta is not called each step."""
    prompt_ids, output_ids = split_encode(tok, "Hello", " " + "blah " * 50 + "STOP here")
    detok = IncrementalDetokenizer(tok, prompt_ids, ["STOP"])
    results = [detok.add_tokens([t]) for t in output_ids]
    assert results.count("STOP") == 1
    assert detok.text == " " + "blah " * 50
    assert detok.take_delta(finished=True) == detok.text


def test_several_tokens_at_once(tok):
    prompt_ids, output_ids = split_encode(tok, "Hello", " world 😀 and more")
    detok = IncrementalDetokenizer(tok, prompt_ids, [])
    deltas = [detok.add_tokens(output_ids[i:i + 3]) or detok.take_delta(False) for i in range(0, len(output_ids), 3)]
    deltas.append(detok.take_delta(True))
    assert "".join(deltas) == detok.text == reference(tok, prompt_ids, output_ids)


def test_decode_window_stays_short(tok):
    """Per-token cost must not grow with the output: only a few tokens are decoded each step."""
    lengths: list[int] = []

    class Counting:
        def __getattr__(self, name):
            return getattr(tok, name)

        def decode(self, ids, **kwargs):
            lengths.append(len(ids))
            return tok.decode(ids, **kwargs)

    prompt_ids, output_ids = split_encode(tok, "Hello", " the quick brown fox 😀 jumps" * 40)
    detok, deltas, _ = stream(Counting(), prompt_ids, output_ids)
    assert len(output_ids) > 300
    assert "".join(deltas) == reference(tok, prompt_ids, output_ids)
    assert max(lengths) <= 10


def test_bad_stop_strings(tok):
    with pytest.raises(ValueError):
        IncrementalDetokenizer(tok, [1], [""])
