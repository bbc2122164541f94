"""What a JSON schema on every request costs the engine: out tok/s with and without it, same run, one table.

Workload: --requests (256) random prompts of 64-512 tokens, outputs up to 16-256 tokens (seeded), at most 256
sequences at once, greedy; the same requests three ways, alternating for --rounds rounds:
  plain     no constraint, EOS ignored (every request runs to its max_tokens);
  json      response_format json_schema {"text": string} on every request: random weights write the string until
            max_tokens, so every step of every request fills and applies a grammar mask (the worst case), and
            the output lengths match the plain run's;
  choice    a two-way choice on every request (short outputs: compiles and admission, not masks).
A random-weight Llama of --shape with the vocabulary of --tokenizer (a real BPE tokenizer directory: a grammar
needs real token strings; e.g. the SmolLM2 checkpoint that tests/smollm2.py writes), written to a temporary
directory.

    python bench/structured_outputs.py --tokenizer DIR                 # TinyLlama-1.1B shape on cuda
    python bench/structured_outputs.py --tokenizer DIR --shape tiny --device cpu --requests 32   # smoke test
"""
from __future__ import annotations

import argparse, json, random, statistics, sys, tempfile, time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

SHAPES = {
    "tinyllama-1.1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                           num_key_value_heads=4),
    "llama2-7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                      num_key_value_heads=32),
    "tiny": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2),
}
SCHEMA = {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}


def write_model(shape: str, tokenizer_dir: Path, out: Path, device: str) -> Path:
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    torch.set_default_dtype(torch.float32 if device == "cpu" else torch.bfloat16)
    try:
        with torch.device(device):
            LlamaForCausalLM(LlamaConfig(**SHAPES[shape], vocab_size=len(tokenizer),
                                         max_position_embeddings=4096)).save_pretrained(out)
    finally:
        torch.set_default_dtype(torch.float32)
    tokenizer.save_pretrained(out)
    return out


def main() -> int:
    import torch

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokenizer", required=True, type=Path)
    parser.add_argument("--shape", default="tinyllama-1.1b", choices=SHAPES)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    from engine.llm import LLM
    from engine.sampling_params import SamplingParams, StructuredOutputsParams

    with tempfile.TemporaryDirectory(prefix="inferq-structured-") as tmp:
        model = write_model(args.shape, args.tokenizer, Path(tmp) / args.shape, args.device)
        llm = LLM(str(model), device=args.device, max_num_seqs=256, max_num_batched_tokens=8192)
        vocab = llm.engine.vocab_size
        r = random.Random(0)
        reqs = [([r.randrange(3, vocab) for _ in range(r.randint(64, 512))], r.randint(16, 256))
                for _ in range(args.requests)]
        kinds = {
            "plain": lambda m: SamplingParams(temperature=0, max_tokens=m, ignore_eos=True),
            "json": lambda m: SamplingParams(temperature=0, max_tokens=m, structured_outputs=StructuredOutputsParams(
                json=SCHEMA)),
            "choice": lambda m: SamplingParams(temperature=0, max_tokens=m, structured_outputs=StructuredOutputsParams(
                choice=("yes", "no"))),
        }
        llm.generate([p for p, _ in reqs[:8]], [kinds["json"](8) for _ in range(8)])  # warm-up and first compile
        results: dict[str, list[tuple[float, int]]] = {k: [] for k in kinds}
        for _ in range(args.rounds):
            for kind, make in kinds.items():
                start = time.monotonic()
                outs = llm.generate([p for p, _ in reqs], [make(m) for _, m in reqs])
                seconds = time.monotonic() - start
                tokens = sum(len(o.outputs[0].token_ids) for o in outs)
                results[kind].append((seconds, tokens))
                valid = sum(_valid_json(o.outputs[0].text, o.outputs[0].finish_reason) for o in outs) \
                    if kind == "json" else None
                print(f"{kind}: {tokens / seconds:.0f} out tok/s, {tokens} tokens in {seconds:.2f} s"
                      + (f", {valid} of {len(outs)} whole outputs parse" if valid is not None else ""), flush=True)
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else args.device
    plain = statistics.median(t / s for s, t in results["plain"])
    print(f"\n== structured outputs, {name}, {args.shape}, {args.requests} requests, {args.rounds} rounds ==")
    print("| requests | out tok/s (median) | × plain |")
    print("|---|---|---|")
    for kind, runs in results.items():
        rate = statistics.median(t / s for s, t in runs)
        print(f"| {kind} | {rate:.0f} | {rate / plain:.2f} |")
    return 0


def _valid_json(text: str, finish_reason: str | None) -> bool:
    """A finished output must parse; one cut at max_tokens is a prefix of valid JSON (not checked)."""
    if finish_reason != "stop":
        return True
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


if __name__ == "__main__":
    sys.exit(main())
