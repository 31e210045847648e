"""Dataclass arguments become command-line flags (as TRL's configs do): `lr: float = 1e-3` with
`metadata={"help": ...}` becomes `--lr`, and a bool becomes `--flag` / `--no-flag`."""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing


def arg(default, help: str, **kwargs):
    """A dataclass field with help text."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata={"help": help, **kwargs})
    return dataclasses.field(default=default, metadata={"help": help, **kwargs})


def add_dataclass_arguments(parser: argparse.ArgumentParser, cls) -> None:
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
        flag = "--" + f.name.replace("_", "-")
        help_text = f.metadata.get("help", "")
        positional = f.metadata.get("positional", False)
        origin = typing.get_origin(kind)
        if origin in (typing.Union, types.UnionType):  # Optional[X] -> X
            kind = next(a for a in typing.get_args(kind) if a is not type(None))
            origin = typing.get_origin(kind)
        if kind is bool:
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
        elif origin is list:
            item = typing.get_args(kind)[0]
            if positional:
                parser.add_argument(f.name, nargs="+", type=item, help=help_text)
            else:
                # "extend": `--lora a=X b=Y` and `--lora a=X --lora b=Y` give the same list
                parser.add_argument(flag, nargs="+", type=item, default=default, help=help_text, dest=f.name,
                                    action="extend")
        elif positional:
            parser.add_argument(f.name, type=kind, help=help_text)
        else:
            choices = f.metadata.get("choices")
            parser.add_argument(flag, type=kind, default=default, help=f"{help_text} (default: {default})",
                                choices=choices, dest=f.name)


def parse_into(cls, argv: list[str] | None = None, prog: str | None = None):
    parser = argparse.ArgumentParser(prog=prog, description=(cls.__doc__ or "").strip().splitlines()[0])
    add_dataclass_arguments(parser, cls)
    return cls(**vars(parser.parse_args(argv)))


def from_namespace(cls, namespace: argparse.Namespace):
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(namespace).items() if k in names})
