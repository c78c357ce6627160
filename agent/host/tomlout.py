"""Write the small TOML documents edgeops generates (agent.toml from a board file).

The standard library reads TOML but does not write it. What we emit is narrow:
tables of scalars, lists of scalars, inline tables of scalars and arrays of
tables, so a few lines here beat a dependency on the device. Every output is
read back with ``tomllib`` by the tests.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else string(k)


def string(s: str) -> str:
    """A TOML basic string: quote, backslash and control characters escaped, the rest as is
    (JSON's escaping is close but writes DEL raw and astral characters as surrogate pairs,
    which TOML forbids)."""
    out = []
    for ch in s:
        if ch in ('"', "\\"):
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if math.isnan(v):
            return "nan"
        return repr(v) if math.isfinite(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, str):
        return string(v)
    if isinstance(v, list | tuple):
        return "[" + ", ".join(value(x) for x in v) + "]"
    if isinstance(v, Mapping):
        return "{ " + ", ".join(f"{key(k)} = {value(x)}" for k, x in v.items()) + " }"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def table(name: str, doc: Mapping[str, Any]) -> str:
    """``[name]`` with its scalar keys, then its arrays of tables as ``[[name.key]]``."""
    lines = [f"[{name}]"]
    arrays: list[tuple[str, list[Mapping[str, Any]]]] = []
    for k, v in doc.items():
        if isinstance(v, list) and v and all(isinstance(x, Mapping) for x in v):
            arrays.append((k, v))
        else:
            lines.append(f"{key(k)} = {value(v)}")
    for k, items in arrays:
        for item in items:
            lines.append(f"[[{name}.{key(k)}]]")
            lines += [f"{key(ik)} = {value(iv)}" for ik, iv in item.items()]
    return "\n".join(lines) + "\n"
