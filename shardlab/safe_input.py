"""The one boundary for untrusted input: files, text and values that enter shardlab pass through here.

Everything a person (or a browser) hands shardlab is read with limits, so no input can crash,
hang or exhaust memory, and every message quotes a value at a readable length:

- files: regular files only (a FIFO, a device or a link to /dev/zero would block or never end),
  at most MAX_FILE_BYTES;
- YAML: parsed to a node graph first, and refused when aliases would expand it beyond MAX_NODES
  values or it nests deeper than MAX_DEPTH (a 640-byte "billion laughs" plan is ~10^9 values);
  a value YAML's own constructors reject (`!!bool maybe`, `!!int abc`) is a message, not a KeyError;
- data: mapping keys must be names (strings), whole numbers at most MAX_INT in size (Python cannot
  even print an int past 4300 digits);
- messages: `short(v)` quotes any value (a 10^6-item list, a 4000-digit int) in at most ~SHORT chars,
  and `cap(msg)` keeps any message under MAX_MESSAGE characters.

Errors are shardlab.plan.PlanError (via `fail`), so the CLI exits 2 with the message and no traceback.
"""

from __future__ import annotations

import json
import math
import os
import re
import reprlib
import stat
from pathlib import Path
from typing import Any

import yaml

MAX_FILE_BYTES = 4 * 2**20  # 4 MiB: the largest real DeepSpeed / accelerate config is a few KB
MAX_NODES = 100_000  # values in a document after alias expansion
MAX_DEPTH = 64  # nesting levels (real configs use 3-4)
MAX_INT = 10**18  # whole numbers beyond this are no size, count or step anyone means
MAX_PARAMS = 10**15  # parameters: a thousand times the largest model trained so far
SHORT = 80  # characters of a quoted value
MAX_MESSAGE = 1500  # characters of one message (the contract: every message < 2 KB)

_repr = reprlib.Repr()
_repr.maxstring = SHORT
_repr.maxother = SHORT
_repr.maxlist = _repr.maxdict = _repr.maxtuple = _repr.maxset = 6
_repr.maxlevel = 3


def fail(field: str, message: str):
    """A PlanError for bad input at `field` (import here: plan.py imports this module)."""
    from shardlab.plan import bad_input

    return bad_input(field, message)


# ---------------------------------------------------------------------------------------------
# Quoting values in messages


def label(name: str) -> str:
    """A file name or text label for a message, at most 200 characters."""
    name = str(name)
    return name if len(name) <= 200 else name[:197] + "..."


_KINDS = {"int": "number", "float": "number", "NoneType": "null", "bool": "true/false"}


def short(v: Any, n: int = SHORT) -> str:
    """repr(v) at a readable length: never raises, never builds a huge string."""
    try:
        if isinstance(v, bool) or v is None:
            return repr(v)
        if isinstance(v, int):
            if v.bit_length() > 200:
                return f"<a whole number of about {int(v.bit_length() * 0.30103) + 1} digits>"
            s = repr(v)
        elif isinstance(v, str):
            s = repr(v if len(v) <= n else v[: n - 3])
            if len(v) > n:
                s = s[:-1] + "...'" if s.endswith("'") else s + "..."
        else:
            s = _repr.repr(v)
    except Exception:  # noqa: BLE001 - a value that cannot even be shown is named by its type
        s = f"<{type(v).__name__}>"
    return s if len(s) <= n + 5 else s[: n] + "..."


def cap(message: str) -> str:
    """A message no longer than MAX_MESSAGE characters (the middle is cut, the fix at the end kept), in
    valid UTF-8 (lone surrogates that a YAML/JSON escape such as "\\ud800" makes are written as escapes)."""
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    if len(message) <= MAX_MESSAGE:
        return message
    keep = MAX_MESSAGE // 2 - 10
    return f"{message[:keep]} [...] {message[-keep:]}"


# ---------------------------------------------------------------------------------------------
# Files


def read_file(path: str | Path, what: str = "file") -> str:
    """A regular file's UTF-8 text, at most MAX_FILE_BYTES; PlanError naming the path otherwise."""
    p = Path(path)
    name = label(str(p))
    try:
        st = os.stat(p)  # follows links: a link to /dev/zero is judged as /dev/zero
    except FileNotFoundError:
        raise fail(str(p)[:200], f"{name}: no such file (file not found). Check the path (a relative path starts at {label(os.getcwd())}).") from None
    except (OSError, ValueError) as e:
        why = getattr(e, "strerror", None) or str(e)
        raise fail(str(p)[:200], f"{name} cannot be opened ({short(why)}). Check the path and its permissions.") from None
    if stat.S_ISDIR(st.st_mode):
        raise fail(str(p)[:200], f"{name} is a directory, not a {what}. Give the path of a .yaml or .json file.")
    if not stat.S_ISREG(st.st_mode):
        raise fail(str(p)[:200], f"{name} is not a regular file (a pipe, socket or device); shardlab reads only files. Save the {what} to a file and give its path.")
    if st.st_size > MAX_FILE_BYTES:
        raise fail(str(p)[:200], f"{name} is {st.st_size / 2**20:.1f} MiB; a {what} is at most {MAX_FILE_BYTES // 2**20} MiB. Give the config file itself.")
    try:
        with open(p, "rb") as f:
            data = f.read(MAX_FILE_BYTES + 1)
    except OSError as e:
        raise fail(str(p)[:200], f"{name} cannot be read ({e.strerror}). Check its permissions.") from None
    if len(data) > MAX_FILE_BYTES:
        raise fail(str(p)[:200], f"{name} is larger than {MAX_FILE_BYTES // 2**20} MiB; a {what} is at most that. Give the config file itself.")
    return decode(data, name, what)


def decode(data: bytes | str, name: str = "<text>", what: str = "file") -> str:
    if isinstance(data, str):
        text = data
    else:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(name, f"{label(name)} is not UTF-8 text. Save it as a UTF-8 YAML or JSON file.") from None
    if len(text) > MAX_FILE_BYTES:
        raise fail(name, f"{label(name)} is larger than {MAX_FILE_BYTES // 2**20} MiB; a {what} is at most that.")
    return text


def is_existing_file(s: str) -> bool:
    """True if `s` names an existing path (of any kind); text too long or odd for a path is not one."""
    if len(s) > 4096 or "\n" in s or "\x00" in s:
        return False
    try:
        return Path(s).exists()
    except (OSError, ValueError):
        return False


# ---------------------------------------------------------------------------------------------
# Parsing


def load_yaml(text: str, name: str = "<text>") -> Any:
    """yaml.safe_load with limits: alias expansion, nesting depth, constructor errors as messages."""
    if _bracket_depth(text) > MAX_DEPTH:  # PyYAML's scanner is quadratic in flow nesting: refuse before it
        raise fail(name, f"{label(name)} nests deeper than {MAX_DEPTH} levels. A config has a few levels; fix its structure.")
    loader = yaml.SafeLoader(text)
    try:
        try:
            node = loader.get_single_node()
        except RecursionError:
            raise fail(name, f"{label(name)} nests deeper than {MAX_DEPTH} levels. A config has a few levels; fix its structure.") from None
        if node is None:
            return None
        _measure(node, name)
        try:
            data = loader.construct_document(node)
        except (yaml.constructor.ConstructorError, ValueError, KeyError, TypeError, OverflowError, AttributeError, RecursionError) as e:
            # YAML's own constructors fail on values such as `!!bool maybe` or `!!int abc`
            why = getattr(e, "problem", None) or f"{type(e).__name__}: {e}"
            raise fail(name, f"{label(name)} has a value YAML cannot read ({short(str(why), 200)[1:-1]}). Quote it, or fix its tag.") from None
    finally:
        loader.dispose()
    check_data(data, name)
    return data


_NOT_BRACKET = re.compile(r"[^\[\]{}]+")


def _bracket_depth(text: str) -> int:
    """The deepest nesting of [ and { in `text` (brackets inside quotes counted too: an upper bound)."""
    depth = deepest = 0
    for ch in _NOT_BRACKET.sub("", text):
        if ch in "[{":
            depth += 1
            if depth > deepest:
                deepest = depth
                if deepest > MAX_DEPTH:
                    return deepest
        elif ch in "]}" and depth:
            depth -= 1
    return deepest


def _measure(root: yaml.Node, name: str) -> None:
    """Count the values `root` expands to (aliases counted each time they are used) and its depth,
    without expanding anything; refuse past the limits or on a node that contains itself."""
    sizes: dict[int, int] = {}
    depths: dict[int, int] = {}
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    open_: set[int] = set()
    while stack:
        node, done = stack.pop()
        key = id(node)
        if done:
            kids = _children(node)
            sizes[key] = 1 + sum(sizes[id(k)] for k in kids)
            depths[key] = 1 + max((depths[id(k)] for k in kids), default=0)
            open_.discard(key)
            if sizes[key] > MAX_NODES:
                raise fail(name, f"{label(name)} expands to more than {MAX_NODES:,} values (YAML anchors and aliases repeat their content). A config is far smaller; remove the repeated aliases.")
            if depths[key] > MAX_DEPTH:
                raise fail(name, f"{label(name)} nests deeper than {MAX_DEPTH} levels. A config has a few levels; fix its structure.")
            continue
        if key in sizes:
            continue
        if key in open_:
            raise fail(name, f"{label(name)} has an anchor that contains itself (a recursive alias). Remove the recursion.")
        open_.add(key)
        stack.append((node, True))
        for k in _children(node):
            if id(k) not in sizes:
                stack.append((k, False))


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    if isinstance(node, yaml.MappingNode):
        return [x for pair in node.value for x in pair]
    return []


def load_json(text: str, name: str = "<text>") -> Any:
    """json.loads, then the same value checks as YAML (JSON has no aliases; its size is bounded by the file's).
    Nesting past MAX_DEPTH is refused before parsing (json's parser recurses: RecursionError otherwise)."""
    if _bracket_depth(text) > MAX_DEPTH:
        raise fail(name, f"{label(name)} nests deeper than {MAX_DEPTH} levels. A config has a few levels; fix its structure.")
    data = json.loads(text)
    check_data(data, name)
    return data


def check_data(data: Any, name: str = "<text>") -> None:
    """Walk parsed data: keys must be names, whole numbers bounded, nesting and size bounded."""
    stack: list[tuple[Any, str, int]] = [(data, "", 0)]
    seen = 0
    while stack:
        v, where, depth = stack.pop()
        seen += 1
        if seen > MAX_NODES:
            raise fail(name, f"{label(name)} holds more than {MAX_NODES:,} values. A config is far smaller.")
        if depth > MAX_DEPTH:
            raise fail(name, f"{label(name)} nests deeper than {MAX_DEPTH} levels. A config has a few levels; fix its structure.")
        here = where or "(top level)"
        if isinstance(v, dict):
            for k, x in v.items():
                if not isinstance(k, str):
                    raise fail(here, f"{label(name)}: the key {short(k)} under {label(here)} is a {_KINDS.get(type(k).__name__, type(k).__name__)}; keys must be names. Quote it (e.g. \"{short(k, 40)}\": ...).")
                stack.append((x, f"{where}.{k}" if where else k, depth + 1))
        elif isinstance(v, list):
            for i, x in enumerate(v):
                stack.append((x, f"{where}[{i}]", depth + 1))
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_INT:
            raise fail(here, f"{label(here)}={short(v)} is too large (more than {MAX_INT:.0e}). Use a realistic size or count.")


def finite_number(field: str, v: Any, *, positive: bool = False) -> float:
    """A finite float from `v` (a flag's or a field's value), or PlanError naming field and value."""
    try:
        f = float(v)
    except (TypeError, ValueError, OverflowError):
        raise fail(field, f"{field}={short(v)} is not a number. Give a number such as 1e-4.") from None
    if not math.isfinite(f):
        raise fail(field, f"{field}={short(v)} is not a finite number. Give a finite value such as 1e-4.")
    if positive and f <= 0:
        raise fail(field, f"{field}={short(v)} must be greater than 0.")
    return f
