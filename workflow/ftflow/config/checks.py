"""Checks of names and keys, and the one "did you mean" suggestion every config error uses.

Standard library only (and ftflow.errors): the schema check and every
resolution step build on it.
"""

from __future__ import annotations

import difflib
import re
from typing import Any, Iterable

from ..errors import ConfigError

# Names become path components of results/ and wildcard values: no '/', no '..'.
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")


def did_you_mean(word: Any, choices: Iterable[Any], prefix: str = "") -> str | None:
    """ "did you mean 'x'?" for the choice closest to a mistyped word, or None when none is close.

    `prefix` is prepended to the suggestion (a sweep's dotted key names its section too).
    """
    matches = difflib.get_close_matches(str(word), [str(c) for c in choices], n=1, cutoff=0.75)
    return f"did you mean {prefix + matches[0]!r}?" if matches else None


def check_name(path: str, name: Any, what: str) -> None:
    if not isinstance(name, str) or not NAME_RE.match(name) or ".." in name:
        raise ConfigError(
            path,
            f"invalid {what} name {name!r}",
            "use letters, digits, '.', '_' and '-', starting with a letter or digit; no '/' or '..'",
        )


def check_mapping(path: str, section: Any) -> None:
    if not isinstance(section, dict):
        raise ConfigError(path, f"expected a mapping, got {type(section).__name__}")


def check_keys(path: str, section: Any, allowed: Iterable[str]) -> None:
    """Every key of `section` is one of `allowed`; the first that is not is named with a suggestion."""
    check_mapping(path, section)
    for key in section:
        if key not in allowed:
            raise ConfigError(f"{path}.{key}", "unknown key", did_you_mean(key, allowed))


def check_choice(path: str, value: Any, choices: Iterable[str], what: str = "value") -> None:
    """`value` is one of `choices` (an enum of the schema, for values the schema does not see)."""
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(path, f"unknown {what} {value!r}", f"one of {', '.join(choices)}")
