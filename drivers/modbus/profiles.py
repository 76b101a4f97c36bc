"""Device profiles as data: YAML files looked up by name, validated into frozen models.

A name (``generic-8di``) resolves to ``generic-8di.yaml`` in the configured profile
directories first, then among the profiles shipped with the package
(``config/profiles``, importable as the ``campus_gateway_profiles`` package). Each
driver family validates the document with its own model.
"""

from __future__ import annotations

import importlib.resources
import re
from collections.abc import Callable, Sequence
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import ValidationError

from gateway.errors import ConfigError

SHIPPED_PACKAGE = "campus_gateway_profiles"
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"

P = TypeVar("P")


def read_yaml(text: str, source: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"line {mark.line + 1} column {mark.column + 1}" if mark else ""
        raise ConfigError(source, [(where, f"invalid YAML: {exc.problem}")]) from exc
    except yaml.YAMLError as exc:
        raise ConfigError(source, [("", f"invalid YAML: {exc}")]) from exc


def shipped_dir() -> Traversable:
    """The profiles shipped with the package (a source checkout's config/profiles if not installed)."""
    try:
        return importlib.resources.files(SHIPPED_PACKAGE)
    except ModuleNotFoundError:
        return Path(__file__).resolve().parents[2] / "config" / "profiles"


def search_path(dirs: Sequence[Path]) -> list[Traversable]:
    return [*dirs, shipped_dir()]


def find_profile(name: str, dirs: Sequence[Path]) -> Traversable | None:
    """The file a profile name resolves to: the first directory that has it wins."""
    if not re.match(NAME_PATTERN, name) or name.endswith((".yaml", ".yml")):
        return None
    for base in search_path(dirs):
        candidate = base.joinpath(f"{name}.yaml")
        if candidate.is_file():
            return candidate
    return None


def available_profiles(dirs: Sequence[Path]) -> list[str]:
    names: set[str] = set()
    for base in search_path(dirs):
        if base.is_dir():
            names.update(e.name.removesuffix(".yaml") for e in base.iterdir() if e.name.endswith(".yaml"))
    return sorted(names)


def load(name: str, dirs: Sequence[Path], parse: Callable[[Any, str], P]) -> P:
    """Find a profile and validate it with ``parse(data, source)``; ConfigError if unknown or invalid."""
    found = find_profile(name, dirs)
    if found is None:
        known = ", ".join(available_profiles(dirs)) or "none"
        raise ConfigError(f"profile {name!r}", [("", f"not found; known profiles: {known}")])
    source = str(found)
    try:
        text = found.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(source, [("", f"cannot read: {exc}")]) from exc
    return parse(read_yaml(text, source), source)


def issues(err: ValidationError) -> list[tuple[str, str]]:
    issues = []
    for e in err.errors(include_url=False):
        path = ""
        for part in e["loc"]:
            path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
        msg = {"extra_forbidden": "unknown key", "missing": "required"}.get(e["type"], e["msg"])
        issues.append((path, msg))
    return issues
