"""Engine outputs -> OpenAI response bodies (completion and chat completion), as stored in the job record."""
from __future__ import annotations

import time

from engine.outputs import CompletionOutput, RequestOutput


def usage(output: RequestOutput) -> dict[str, int]:
    prompt = len(output.prompt_token_ids)
    completion = sum(len(c.token_ids) for c in output.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def finish_reason(choice: CompletionOutput) -> str | None:
    return "stop" if choice.finish_reason == "abort" else choice.finish_reason


def completion_logprobs(choice: CompletionOutput, tokenizer) -> dict | None:
    if choice.logprobs is None:
        return None
    tokens = tokenizer.convert_ids_to_tokens(choice.token_ids)
    offsets, offset = [], 0
    for token_id in choice.token_ids:
        offsets.append(offset)
        offset += len(tokenizer.decode([token_id]))
    return {"tokens": tokens,
            "token_logprobs": [entry[t] for entry, t in zip(choice.logprobs, choice.token_ids)],
            "top_logprobs": [{tokenizer.convert_ids_to_tokens(i): lp for i, lp in entry.items() if i != t}
                             | {tokens[n]: entry[t]} for n, (entry, t) in enumerate(zip(choice.logprobs,
                                                                                          choice.token_ids))],
            "text_offset": offsets}


def chat_logprobs(choice: CompletionOutput, tokenizer, top: int) -> dict | None:
    if choice.logprobs is None:
        return None

    def item(token_id: int, logprob: float) -> dict:
        text = tokenizer.decode([token_id])
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = []
    for entry, token_id in zip(choice.logprobs, choice.token_ids):
        alternatives = sorted(entry.items(), key=lambda kv: kv[1], reverse=True)[:top]
        content.append(item(token_id, entry[token_id]) | {"top_logprobs": [item(i, lp) for i, lp in alternatives]})
    return {"content": content}


def completion_body(job_id: str, model: str, output: RequestOutput, tokenizer) -> dict:
    return {"id": f"cmpl-{job_id}", "object": "text_completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "text": c.text, "logprobs": completion_logprobs(c, tokenizer),
                         "finish_reason": finish_reason(c)} for c in output.outputs],
            "usage": usage(output)}


def chat_body(job_id: str, model: str, output: RequestOutput, tokenizer, top_logprobs: int) -> dict:
    return {"id": f"chatcmpl-{job_id}", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": c.index, "message": {"role": "assistant", "content": c.text},
                         "logprobs": chat_logprobs(c, tokenizer, top_logprobs),
                         "finish_reason": finish_reason(c)} for c in output.outputs],
            "usage": usage(output)}
