"""The `inferq` command line: demo-model and generate (offline inference)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path


def default_model_dir() -> Path:
    """The embedded default model: the demo checkpoint, written on first use."""
    home = Path(os.environ.get("INFERQ_HOME", Path.home() / ".cache" / "inferq"))
    return home / "demo-model"


def ensure_demo_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from engine.demo_model import write_demo_model

        logging.getLogger(__name__).info("writing the demo model to %s", path)
        write_demo_model(path)
    return path


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """Engine flags, named as in the seed recipe and vLLM."""
    parser.add_argument("--model", help="HF checkpoint directory (default: the demo model)")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda[:i] | xpu[:i]")
    parser.add_argument("--dtype", default="auto", help="auto | bfloat16 | float16 | float32")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--max-num-batched-tokens", type=int, default=4096)
    parser.add_argument("--max-model-len", type=int)
    parser.add_argument("--block-size", type=int, default=16)
    parser.add_argument("--num-kv-blocks", type=int)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)


def engine_options(args: argparse.Namespace) -> dict:
    model = Path(args.model) if args.model else ensure_demo_model(default_model_dir())
    return dict(model=str(model), device=args.device, dtype=args.dtype, max_num_seqs=args.max_num_seqs,
                max_num_batched_tokens=args.max_num_batched_tokens, max_model_len=args.max_model_len,
                block_size=args.block_size, num_kv_blocks=args.num_kv_blocks,
                gpu_memory_utilization=args.gpu_memory_utilization)


def cmd_demo_model(args: argparse.Namespace) -> int:
    from engine.demo_model import write_demo_model

    path = write_demo_model(Path(args.dir), size=args.size, vocab_size=args.vocab_size, seed=args.seed)
    print(path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from engine.llm import LLM
    from engine.sampling_params import SamplingParams

    options = engine_options(args)
    params = SamplingParams(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed,
                            max_tokens=args.max_tokens, stop=args.stop or [])
    llm = LLM(**options)
    for output in llm.generate(args.prompt, params):
        for choice in output.outputs:
            print(choice.text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="inferq", description="LLM inference engine and job queue")
    parser.add_argument("--log-level", default="WARNING")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo-model", help="write a small random-weight Llama checkpoint (HF format)")
    demo.add_argument("dir")
    demo.add_argument("--size", default="tiny", help="tiny | small | 100m")
    demo.add_argument("--vocab-size", type=int, default=2000)
    demo.add_argument("--seed", type=int, default=0)
    demo.set_defaults(func=cmd_demo_model)

    generate = commands.add_parser("generate", help="offline generation for one or more prompts")
    add_engine_arguments(generate)
    generate.add_argument("--prompt", action="append", required=True, help="repeat for several prompts")
    generate.add_argument("--max-tokens", type=int, default=64)
    generate.add_argument("--temperature", type=float, default=0.0)
    generate.add_argument("--top-p", type=float, default=1.0)
    generate.add_argument("--top-k", type=int)
    generate.add_argument("--seed", type=int)
    generate.add_argument("--stop", action="append")
    generate.set_defaults(func=cmd_generate)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        return args.func(args)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
