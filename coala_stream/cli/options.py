"""CLI options generated from the config dataclasses, so each default and help text exists once.

A field becomes ``--field-name`` (``metadata["positional"]``: an optional positional
argument); its type comes from the annotation (bool: a flag, int, float, str), its
default from the dataclass, its help, metavar and choices from the metadata;
``metadata["group"]`` puts it in an argument group, ``metadata["exclusive"]`` in a
mutually exclusive group of that name. `config_from_args` builds the dataclass back
from the parsed namespace.
"""

from __future__ import annotations

import argparse
from dataclasses import MISSING, fields


def _kind(annotation: str):
    text = str(annotation)
    if "bool" in text:
        return bool
    if "float" in text:
        return float
    if "int" in text:
        return int
    return str


def add_options(parser: argparse.ArgumentParser, config_cls, skip=()) -> None:
    """Add one argument per field of ``config_cls`` (except ``skip``) to ``parser``."""
    groups: dict[str, argparse._ArgumentGroup] = {}
    exclusive: dict[str, argparse._MutuallyExclusiveGroup] = {}
    for f in fields(config_cls):
        if f.name in skip:
            continue
        meta = f.metadata
        target = parser
        if "group" in meta:
            target = groups.setdefault(meta["group"], parser.add_argument_group(meta["group"]))
        if "exclusive" in meta:
            if meta["exclusive"] not in exclusive:
                exclusive[meta["exclusive"]] = target.add_mutually_exclusive_group(
                    required=bool(meta.get("exclusive_required", meta.get("required"))))
            target = exclusive[meta["exclusive"]]
        _add(target, f)


def _add(target, f) -> None:
    meta, kind = f.metadata, _kind(f.type)
    default = None if f.default is MISSING else f.default
    kwargs = {"help": meta.get("help", "")}
    if meta.get("positional"):
        target.add_argument(f.name, nargs="?", default=default, metavar=meta.get("metavar"),
                            **kwargs)
        return
    flag = "--" + f.name.replace("_", "-")
    if kind is bool:
        target.add_argument(flag, action="store_true", default=bool(default), dest=f.name, **kwargs)
        return
    for key in ("metavar", "choices"):
        if key in meta:
            kwargs[key] = meta[key]
    if meta.get("required") and "exclusive" not in meta:
        kwargs["required"] = True
    target.add_argument(flag, type=kind, default=default, dest=f.name, **kwargs)


def config_from_args(config_cls, args: argparse.Namespace, **extra):
    """``config_cls`` from the parsed arguments (fields the parser did not get keep their default)."""
    values = {f.name: getattr(args, f.name) for f in fields(config_cls) if hasattr(args, f.name)}
    return config_cls(**{**values, **extra})
