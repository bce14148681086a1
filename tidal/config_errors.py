"""Turning validation failures into ConfigError lines: the key path, the value, the rule and the fix."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Sequence
from types import UnionType
from typing import Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError


class ConfigError(ValueError):
    """A config tidal cannot use; ``problems`` holds one line per problem (key, value, rule, fix)."""

    def __init__(self, problems: str | Sequence[str], source: str | None = None) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        self.source = source
        where = f" ({source})" if source else ""
        if len(self.problems) == 1:
            message = f"invalid tidal config{where}: {self.problems[0]}"
        else:
            listed = "\n  - ".join(self.problems)
            message = f"invalid tidal config{where}, {len(self.problems)} problems:\n  - {listed}"
        super().__init__(message)

    def __reduce__(self) -> tuple[type[ConfigError], tuple[list[str], str | None]]:
        return type(self), (self.problems, self.source)


def yaml_problem(exc: Exception) -> str:
    """PyYAML's problem and position on one line (its own message spans several)."""
    mark = getattr(exc, "problem_mark", None)
    where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
    return f"{getattr(exc, 'problem', None) or exc}{where}"


def show_value(value: object, render: Callable[[Any], str] = repr) -> str:
    """``render(value)`` cut to 80 characters for messages; never raises (huge ints and deep
    nesting make repr raise), falling back to the type name."""
    try:
        text = render(value)
    except Exception:  # any object may reach an error message, and its repr may raise anything
        text = f"<{type(value).__name__}>"
    return text if len(text) <= 80 else text[:77] + "..."


def _section_of(annotation: Any) -> type[BaseModel] | None:
    if get_origin(annotation) is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    return None


def _locate(
    loc: tuple[int | str, ...], root: type[BaseModel]
) -> tuple[str, type[BaseModel] | None, type[BaseModel] | None]:
    """Dotted key path of a pydantic error location, the section at that path and its parent."""
    section: type[BaseModel] | None = root
    parent: type[BaseModel] | None = None
    parts: list[str] = []
    union_tag_next = False
    for item in loc:
        if union_tag_next or item == "[key]":  # pydantic's markers, not keys
            union_tag_next = False
            continue
        parent = section
        field = section.model_fields.get(item) if section and isinstance(item, str) else None
        parts.append(str(item))
        section = _section_of(field.annotation) if field else None
        if field is not None:
            origin, members = get_origin(field.annotation), get_args(field.annotation)
            union_tag_next = origin in (Union, UnionType) and type(None) not in members
    return ".".join(parts), section, parent


def _rule(error: Any, section: type[BaseModel] | None) -> str:
    kind, ctx = error["type"], error.get("ctx", {})
    if kind == "literal_error":
        expected = ctx["expected"].replace(" or ", ", ")
        return f"must be one of {expected}" if "," in expected else f"must be {expected}"
    if kind in ("model_type", "dict_type"):
        keys = f" with keys {', '.join(section.model_fields)}" if section else ""
        return f"must be a mapping{keys}"
    bounds = {"greater_than_equal": ">=", "greater_than": ">", "less_than_equal": "<=", "less_than": "<"}
    if kind in bounds:
        return f"must be {bounds[kind]} {next(iter(ctx.values()))}"
    fixed = {
        "int_type": "must be an integer",
        "float_type": "must be a number",
        "finite_number": "must be a finite number (not nan or inf)",
        "bool_type": "must be true or false",
        "string_type": "must be a string",
        "invalid_key": "keys must be strings",
    }
    if kind in fixed:
        return fixed[kind]
    return error["msg"].removeprefix("Value error, ").replace("Input should", "must")


def problems(exc: ValidationError, root: type[BaseModel]) -> list[str]:
    """One line per bad key, in pydantic's order; a union's per-member errors are joined with 'or'."""
    grouped: dict[str, tuple[str | None, list[str]]] = {}  # key path -> (value shown, rules)
    for error in exc.errors():
        path, section, parent = _locate(error["loc"], root)
        if not path:  # the cross-section check: its lines are complete messages
            grouped[path] = (None, _rule(error, None).splitlines())
        elif error["type"] == "extra_forbidden":
            grouped[path] = (None, [_unknown_key(path, parent)])
        else:
            grouped.setdefault(path, (show_value(error["input"]), []))[1].append(_rule(error, section))
    problems: list[str] = []
    for path, (shown, rules) in grouped.items():
        if shown is None:
            problems.extend(rules)
        else:
            joined = rules[0] + "".join(f" or {rule.removeprefix('must be ')}" for rule in rules[1:])
            problems.append(f"{path} = {shown}: {joined}")
    return problems


def _unknown_key(path: str, parent: type[BaseModel] | None) -> str:
    prefix, _, key = path.rpartition(".")
    valid = list(parent.model_fields) if parent else []
    close = difflib.get_close_matches(key, valid, n=1)
    hint = f"did you mean '{prefix + '.' if prefix else ''}{close[0]}'? " if close else ""
    return f"unknown key '{path}'; {hint}valid keys: {', '.join(valid)}"
