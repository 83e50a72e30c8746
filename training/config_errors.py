"""One-line explanations of configuration mistakes, with a suggestion for a mistyped key.

pydantic reports an unknown key as "Extra inputs are not permitted" and a wrong member of a
``Path | OODSetConfig`` union once per member, under internal tags. A user needs the key as
written, the keys valid at that level (or the closest one: ``epoch`` -> ``epochs``) and only the
union member they meant, so :func:`explain` rewrites the errors against the config model's fields.
"""

from __future__ import annotations

import difflib
import types
import typing
from typing import Any

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A configuration the command cannot run with; the message is one line for the user."""


def models_in(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation can hold: itself, union members, dict values, list items."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    if typing.get_origin(annotation) in (typing.Union, types.UnionType, dict, list, tuple):
        return [model for arg in typing.get_args(annotation) for model in models_in(arg)]
    return []


def _all_models(root: type[BaseModel]) -> dict[str, type[BaseModel]]:
    """Every model reachable from ``root``, by class name (pydantic tags union members with it)."""
    found: dict[str, type[BaseModel]] = {}
    pending = [root]
    while pending:
        model = pending.pop()
        if model.__name__ not in found:
            found[model.__name__] = model
            pending.extend(m for field in model.model_fields.values() for m in models_in(field.annotation))
    return found


def _fields_at(root: type[BaseModel], path: tuple[str | int, ...]) -> list[str]:
    """Field names valid at ``path``; dict keys and list indices on the way are stepped over."""
    models = [root]
    for part in path:
        fields = {name: field for model in models for name, field in model.model_fields.items()}
        if part in fields:
            models = models_in(fields[part].annotation)
    return sorted({name for model in models for name in model.model_fields})


def _is_tag(part: str | int, model_names: set[str]) -> bool:
    return isinstance(part, str) and ("[" in part or part in model_names)


def _relevant(errors: list[dict[str, Any]], model_names: set[str]) -> list[dict[str, Any]]:
    """Drop the errors of union members the input was evidently not meant for: where one member
    is a model (a mapping was given), the scalar members' complaints are noise."""
    meant = set()
    for error in errors:
        for i, part in enumerate(error["loc"]):
            if isinstance(part, str) and part in model_names:
                meant.add(error["loc"][:i])
    kept = []
    for error in errors:
        tags = [i for i, part in enumerate(error["loc"]) if _is_tag(part, model_names)]
        if tags and error["loc"][: tags[0]] in meant and error["loc"][tags[0]] not in model_names:
            continue
        kept.append(error)
    return kept


def _explain_one(root: type[BaseModel], error: dict[str, Any], model_names: set[str]) -> str:
    path = tuple(part for part in error["loc"] if not _is_tag(part, model_names))
    dotted = ".".join(str(part) for part in path)
    if error["type"] == "extra_forbidden":
        valid = _fields_at(root, path[:-1])
        parent = "".join(f"{part}." for part in path[:-1])
        close = difflib.get_close_matches(str(path[-1]), valid, n=1, cutoff=0.6)
        if close:
            return f"unknown key '{dotted}' (did you mean '{parent}{close[0]}'?)"
        return f"unknown key '{dotted}' (valid keys{' in ' + parent[:-1] if parent else ''}: {', '.join(valid)})"
    if error["type"] == "missing":
        return f"{dotted}: required, but not given"
    message = error["msg"].removeprefix("Value error, ").rstrip(".")
    given = error.get("input")
    if error["type"] != "value_error" and isinstance(given, (str, int, float, bool)):
        message += f" (got {given!r})"
    return f"{dotted}: {message}" if path else message


def explain(root: type[BaseModel], error: ValidationError) -> str:
    """One line describing every problem ``error`` found in a ``root`` config."""
    model_names = set(_all_models(root))
    errors = _relevant(error.errors(), model_names)
    return "invalid configuration: " + "; ".join(_explain_one(root, e, model_names) for e in errors)
