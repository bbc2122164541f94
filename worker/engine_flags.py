"""The engine's command-line flags, built once from EngineConfig (engine/config.py: each field's help, default and
choices), so that generate, worker and serve take the same ones and serve forwards every one to its worker; and the
model they default to (the demo checkpoint, written on first use)."""
from __future__ import annotations

import argparse
import dataclasses
import logging
import typing
from pathlib import Path

from engine.config import EngineConfig, inferq_home


def default_model_dir() -> Path:
    """The embedded default model: the demo checkpoint, written on first use."""
    return inferq_home() / "demo-model"


def ensure_demo_model(path: Path) -> Path:
    if not (path / "config.json").is_file():
        from engine.demo_model import write_demo_model

        logging.getLogger(__name__).info("writing the demo model to %s", path)
        write_demo_model(path)
    return path


def engine_flag_fields() -> list[dataclasses.Field]:
    """EngineConfig's fields that have a command-line flag (engine/config.py says why the others have none)."""
    return [f for f in dataclasses.fields(EngineConfig) if "no_flag" not in f.metadata]


def engine_flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag", "--" + f.name.replace("_", "-"))


def add_engine_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per EngineConfig field, with its help and default: generate, worker and serve all get the same
    ones, and serve forwards every one to its worker (engine_argv)."""
    group = parser.add_argument_group("engine options")
    types = typing.get_type_hints(EngineConfig)
    for f in engine_flag_fields():
        # `int | None` -> int: None is the default that means "decided at start-up", never typed in.
        kind = next(t for t in typing.get_args(types[f.name]) or (types[f.name],) if t is not type(None))
        options: dict = {"dest": f.name, "help": f.metadata["help"],
                         "default": None if f.default is dataclasses.MISSING else f.default}
        if "choices" in f.metadata:
            options["choices"] = f.metadata["choices"]
        if kind is bool:
            options["action"] = argparse.BooleanOptionalAction  # --flag / --no-flag, None left as "decide"
        else:
            options["type"] = kind
            if "choices" not in f.metadata:  # argparse lists the choices as the metavar
                options["metavar"] = engine_flag(f).removeprefix("--").upper().replace("-", "_")
        group.add_argument(engine_flag(f), **options)


def engine_argv(options: dict) -> list[str]:
    """The engine flags that reproduce `options` (engine_options' result) on another command line: what serve
    passes to its worker. Every value is written out, defaults too, so nothing is lost on the way."""
    argv: list[str] = []
    for f in engine_flag_fields():
        value, flag = options[f.name], engine_flag(f)
        if value is None:
            continue
        if isinstance(value, bool):
            argv.append(flag if value else "--no-" + flag.removeprefix("--"))
        else:
            argv += [flag, str(value)]
    return argv


def add_tool_parser_argument(parser: argparse.ArgumentParser) -> None:
    from api.tool_calls import PARSERS

    parser.add_argument("--tool-call-parser", choices=PARSERS,
                        help="the format the model writes tool calls in (default: from its chat template, else "
                             "hermes)")


def engine_options(args: argparse.Namespace) -> dict:
    """EngineConfig's keyword arguments from the engine flags; the demo model (written on first use) without
    --model."""
    options = {f.name: getattr(args, f.name) for f in engine_flag_fields()}
    options["model"] = str(Path(args.model) if args.model else ensure_demo_model(default_model_dir()))
    return options


def add_chat_template_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--chat-template",
                        help="a Jinja chat template, or a file holding one, used instead of the tokenizer's (for "
                             "/v1/chat/completions and /tokenize)")


def read_chat_template(value: str) -> str:
    """--chat-template: a file's content, or the template itself (as vLLM's flag)."""
    try:
        path = Path(value).expanduser()
        if path.is_file():
            return path.read_text()
    except OSError:  # a template longer than a file name can be
        pass
    if "{{" in value or "{%" in value:
        return value
    raise ValueError(f"--chat-template {value!r}: no such file, and no Jinja template either")


def served_model_name(model: str | Path) -> str:
    """The name clients use unless given: a checkpoint directory's name, a GGUF file's stem."""
    model = Path(model)
    return model.stem if model.suffix == ".gguf" else model.name
