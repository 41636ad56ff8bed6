"""Apply and validate JSON Patches (RFC 6902, pointers per RFC 6901): strict, atomic, bounded.

A patch is checked whole before anything changes (:func:`validate_patch`: shape, pointers,
JSON-ness of values, :class:`PatchLimits`), then applied operation by operation. By default the
document is copied first and the input is never touched; ``in_place=True`` skips that copy and
keeps an undo log instead, so a patch that fails half-way is rolled back and the caller's
document is left as it was either way.

Every refusal is a :class:`~hardening.PatchError` carrying the failing operation's index, the
operation and the reason: :class:`~hardening.InvalidPatch` (malformed, HTTP 422),
:class:`~hardening.PatchLimitExceeded` (over a limit, 413), :class:`~hardening.PatchApplyError`
(does not apply to this document, 422) and :class:`~hardening.PatchTestFailed` (a ``test``
operation, such as an id guard, did not hold, 409).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, fields
from typing import TypeVar, cast

from hardening.blocks._json import MISSING, copy_json, json_equal, pointer
from hardening.errors import (
    ConfigurationError,
    InvalidPatch,
    PatchApplyError,
    PatchError,
    PatchLimitExceeded,
    PatchTestFailed,
)

__all__ = ["PatchLimits", "apply_patch", "validate_patch"]

DocT = TypeVar("DocT")

_DEPTH_CAP = 500  # far below the interpreter's recursion limit, which comparisons rely on
_MAX_INT_DIGITS = 4300  # Python's int <-> str conversion limit: json.dumps refuses bigger ints
_BAD_ESCAPE = re.compile("~(?![01])")
_ADD, _REMOVE, _REPLACE, _MOVE, _COPY, _TEST = range(6)
_KINDS = {
    "add": _ADD,
    "remove": _REMOVE,
    "replace": _REPLACE,
    "move": _MOVE,
    "copy": _COPY,
    "test": _TEST,
}
_NEEDS_VALUE = (_ADD, _REPLACE, _TEST)
_NEEDS_FROM = (_MOVE, _COPY)


@dataclass(frozen=True)
class PatchLimits:
    """Resource bounds on one patch and on what it builds; over one is ``PatchLimitExceeded``.

    Args:
        max_operations: operations in one patch.
        max_bytes: the patch's size as compact JSON (UTF-8 bytes of strings plus punctuation),
            including every value a ``copy`` duplicates, so copies cannot amplify a small patch.
        max_depth: nesting levels: pointer tokens plus the depth of the value put there.
        max_string_length: characters in one string or member name, digits in one number.
        max_array_length: elements of an array in the patch, or of an array it grows.

    Raises:
        ConfigurationError: a bound that is not a positive ``int``, or ``max_depth`` over 500.
    """

    max_operations: int = 10_000
    max_bytes: int = 2 * 1024 * 1024
    max_depth: int = 64
    max_string_length: int = 256 * 1024
    max_array_length: int = 100_000

    def __post_init__(self) -> None:
        for field in fields(self):
            value = getattr(self, field.name)
            if type(value) is not int or value < 1:
                raise ConfigurationError(
                    f"PatchLimits.{field.name} must be a positive int, not {value!r}"
                )
        if self.max_depth > _DEPTH_CAP:
            raise ConfigurationError(f"PatchLimits.max_depth must be at most {_DEPTH_CAP}")


DEFAULT_LIMITS = PatchLimits()


class _Op:
    """One checked operation: its kind, parsed pointers and value."""

    __slots__ = ("from_", "index", "kind", "path", "raw", "value")

    def __init__(
        self,
        index: int,
        kind: int,
        path: list[str],
        from_: list[str] | None,
        value: object,
        raw: dict[str, object],
    ) -> None:
        self.index = index
        self.kind = kind
        self.path = path
        self.from_ = from_
        self.value = value
        self.raw = raw

    def failed(self, reason: str) -> PatchApplyError:
        return PatchApplyError(reason, op_index=self.index, op=self.raw)


def _tokens(text: str) -> list[str] | None:
    """Parse an RFC 6901 pointer into its reference tokens; ``None`` if it is not one."""
    if text == "":
        return []
    if text[0] != "/":
        return None
    parts = text[1:].split("/")
    if "~" not in text:
        return parts
    tokens = []
    for part in parts:
        if "~" in part:
            if _BAD_ESCAPE.search(part):
                return None
            part = part.replace("~1", "/").replace("~0", "~")  # ~1 first: "~01" is "~1"
        tokens.append(part)
    return tokens


def _inside(path: list[str], ancestor: list[str]) -> bool:
    """Whether ``ancestor`` is a proper prefix of ``path``."""
    return len(ancestor) < len(path) and path[: len(ancestor)] == ancestor


def _array_index(token: str) -> int | None:
    """The array index ``token`` spells (RFC 6901 §4: no sign, no leading zero), else None."""
    if token.isdigit() and token.isascii() and (token[0] != "0" or token == "0"):
        return int(token) if len(token) <= 18 else 2**63  # out of range of any real array
    return None


def _utf8_length(text: str, what: str, index: int | None, op: object) -> int:
    r"""The UTF-8 size of non-ASCII ``text``; a lone surrogate (no UTF-8 form) is refused.

    ``json.loads`` accepts ``"\ud800"``, but no database or UTF-8 encoder can store it.
    """
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError as exc:
        bad = text[exc.start : exc.end]
        raise InvalidPatch(
            f"{what} is not valid Unicode: lone surrogate {bad!r} at character {exc.start}",
            op_index=index,
            op=op,
        ) from None


def _type_name(value: object) -> str:
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return "a scalar"


class _Checker:
    """Validates operations and values against the limits, keeping the byte budget."""

    def __init__(self, limits: PatchLimits | None, *, trusted: bool = False) -> None:
        self.limits = limits
        self.trusted = trusted  # stored patches: skip walking values, they were checked once
        self.size = 0

    def parse(self, patch: object) -> list[_Op]:
        if not isinstance(patch, (list, tuple)):
            raise InvalidPatch(
                f"a JSON Patch is an array of operations, not {type(patch).__name__}"
            )
        limits = self.limits
        if limits is not None and len(patch) > limits.max_operations:
            raise PatchLimitExceeded(
                f"the patch has {len(patch)} operations; at most {limits.max_operations} allowed",
                limit="max_operations",
                value=len(patch),
                maximum=limits.max_operations,
            )
        return [self.operation(index, raw) for index, raw in enumerate(patch)]

    def operation(self, index: int, raw: object) -> _Op:
        if not isinstance(raw, dict):
            raise InvalidPatch("an operation must be a JSON object", op_index=index, op=raw)
        op = cast(dict[str, object], raw)
        name = op.get("op", MISSING)
        if name is MISSING:
            raise InvalidPatch("the operation has no 'op' member", op_index=index, op=raw)
        kind = _KINDS.get(name) if isinstance(name, str) else None
        if kind is None:
            raise InvalidPatch(f"unknown operation {name!r}", op_index=index, op=raw)
        path = self.pointer(op, "path", index)
        from_ = self.pointer(op, "from", index) if kind in _NEEDS_FROM else None
        value = op.get("value", MISSING)
        if kind in _NEEDS_VALUE:
            if value is MISSING:
                raise InvalidPatch(f"'{name}' needs a 'value' member", op_index=index, op=raw)
            if not self.trusted:
                self.value(value, 0 if kind == _TEST else len(path), index, raw)
        if kind == _MOVE and from_ is not None and _inside(path, from_):  # RFC 6902 §4.4
            raise InvalidPatch(
                "cannot move a value into one of its own children", op_index=index, op=raw
            )
        self.charge(16 + len(op), index, raw)
        if len(op) > 2 + (kind in _NEEDS_VALUE) + (kind in _NEEDS_FROM) and not self.trusted:
            self.ignored(op, kind, index)
        return _Op(index, kind, path, from_, value, op)

    def ignored(self, op: dict[str, object], kind: int, index: int) -> None:
        """Check the members the operation ignores (RFC 6902 §4) as JSON: they are stored."""
        used = ("op", "path", *(("value",) if kind in _NEEDS_VALUE else ()))
        used += ("from",) if kind in _NEEDS_FROM else ()
        for name, member in op.items():
            if name not in used:
                if not isinstance(name, str):
                    raise InvalidPatch("member names must be strings", op_index=index, op=op)
                self.value(name, 0, index, op)
                self.value(member, 0, index, op)

    def pointer(self, op: dict[str, object], member: str, index: int) -> list[str]:
        text = op.get(member, MISSING)
        if text is MISSING:
            raise InvalidPatch(f"the operation has no '{member}' member", op_index=index, op=op)
        if not isinstance(text, str):
            raise InvalidPatch(f"'{member}' must be a string", op_index=index, op=op)
        if not text.isascii():
            _utf8_length(text, f"'{member}'", index, op)
        tokens = _tokens(text)
        if tokens is None:
            raise InvalidPatch(
                f"'{member}' is not a JSON Pointer (RFC 6901): {text[:100]!r}",
                op_index=index,
                op=op,
            )
        limits = self.limits
        if limits is not None:
            if len(tokens) > limits.max_depth:
                raise self.too_deep(len(tokens), index, op)
            self.charge(len(text) + len(member) + 6, index, op)
        return tokens

    def charge(self, size: int, index: int | None, op: object) -> None:
        self.size += size
        limits = self.limits
        if limits is not None and self.size > limits.max_bytes:
            raise PatchLimitExceeded(
                f"the patch is larger than {limits.max_bytes} bytes",
                limit="max_bytes",
                value=self.size,
                maximum=limits.max_bytes,
                op_index=index,
                op=op,
            )

    def too_deep(self, depth: int, index: int | None, op: object) -> PatchLimitExceeded:
        maximum = self.limits.max_depth if self.limits is not None else _DEPTH_CAP
        return PatchLimitExceeded(
            f"values would nest {depth} levels deep; at most {maximum} allowed",
            limit="max_depth",
            value=depth,
            maximum=maximum,
            op_index=index,
            op=op,
        )

    def value(self, value: object, depth: int, index: int | None, op: object) -> None:
        """Check that ``value`` is JSON within the limits, nested under ``depth`` levels."""
        limits = self.limits
        if limits is None:
            max_string = max_array = 2**63
            max_depth = _DEPTH_CAP
        else:
            max_string, max_array = limits.max_string_length, limits.max_array_length
            max_depth = limits.max_depth
        max_digits = min(max_string, _MAX_INT_DIGITS)
        size = 0
        stack: list[tuple[object, int]] = [(value, depth)]
        while stack:  # iterative: a hostile nesting cannot exhaust the interpreter's stack
            node, level = stack.pop()
            if isinstance(node, str):
                if len(node) > max_string:
                    raise self.too_long("a string", len(node), max_string, index, op)
                size += 2 + (
                    len(node) if node.isascii() else _utf8_length(node, "a string", index, op)
                )
            elif isinstance(node, dict):
                level += 1
                if level > max_depth:
                    raise self.too_deep(level, index, op)
                size += 2 + 4 * len(node)
                for key, item in node.items():
                    if not isinstance(key, str):
                        raise InvalidPatch(
                            f"object member names must be strings, not {type(key).__name__}",
                            op_index=index,
                            op=op,
                        )
                    if len(key) > max_string:
                        raise self.too_long("a member name", len(key), max_string, index, op)
                    size += (
                        len(key) if key.isascii() else _utf8_length(key, "a member name", index, op)
                    )
                    stack.append((item, level))
            elif isinstance(node, list):
                level += 1
                if level > max_depth:
                    raise self.too_deep(level, index, op)
                if len(node) > max_array:
                    raise PatchLimitExceeded(
                        f"an array has {len(node)} elements; at most {max_array} allowed",
                        limit="max_array_length",
                        value=len(node),
                        maximum=max_array,
                        op_index=index,
                        op=op,
                    )
                size += 2 + len(node)
                stack.extend((item, level) for item in node)
            elif node is None or isinstance(node, bool):
                size += 5
            elif isinstance(node, int):
                digits = node.bit_length() * 30103 // 100000 + 1
                if digits > max_digits:
                    raise self.too_long("a number", digits, max_digits, index, op)
                size += digits + 1
            elif isinstance(node, float):
                if not math.isfinite(node):
                    raise InvalidPatch(f"{node!r} is not a JSON number", op_index=index, op=op)
                size += 24
            else:
                raise InvalidPatch(
                    f"a {type(node).__name__} is not a JSON value", op_index=index, op=op
                )
            if size > 65536:  # settle the account now and then, so a huge value stops early
                self.charge(size, index, op)
                size = 0
        self.charge(size, index, op)

    def too_long(
        self, what: str, length: int, maximum: int, index: int | None, op: object
    ) -> PatchLimitExceeded:
        return PatchLimitExceeded(
            f"{what} has {length} characters; at most {maximum} allowed",
            limit="max_string_length",
            value=length,
            maximum=maximum,
            op_index=index,
            op=op,
        )


# Undo records: how to put one container back as it was.
_RESTORE_MEMBER, _UNDO_INSERT, _UNDO_DELETE, _UNDO_SET = range(4)


class _Patcher:
    """Applies checked operations to a document, optionally logging how to undo each change."""

    def __init__(
        self,
        root: object,
        checker: _Checker,
        *,
        undo: bool,
        copy_values: bool = True,
        share: bool = False,
    ) -> None:
        self.root = root
        self.checker = checker
        self.undo: list[tuple[int, object, object, object]] | None = [] if undo else None
        self.copy_values = copy_values
        # share: copy on write. The containers this patcher copied (by id, kept alive here so
        # no id is reused) are its own to change; any other is the caller's, copied before a
        # change below it and put in its (own) parent's place.
        self.owned: dict[int, object] | None = {} if share else None

    def run(self, op: _Op) -> None:
        kind = op.kind
        if kind == _ADD:
            self.add(op.path, self.fresh(op.value), op)
        elif kind == _REMOVE:
            self.remove(op.path, op)
        elif kind == _REPLACE:
            self.replace(op.path, self.fresh(op.value), op)
        elif kind == _TEST:
            if not json_equal(self.get(op.path, op), op.value):
                raise PatchTestFailed(
                    f"test failed: the value at {op.raw.get('path')!r} is not the expected one",
                    op_index=op.index,
                    op=op.raw,
                )
        elif kind == _MOVE:
            self.move(cast(list[str], op.from_), op.path, op)
        else:
            value = self.get(cast(list[str], op.from_), op)
            self.checker.value(value, len(op.path), op.index, op.raw)  # copies cost bytes too
            self.add(op.path, copy_json(value), op)

    def fresh(self, value: object) -> object:
        """The patch's value as the document will hold it: a copy, so neither aliases the other."""
        return copy_json(value) if self.copy_values else value

    def log(self, record: tuple[int, object, object, object]) -> None:
        if self.undo is not None:
            self.undo.append(record)

    def rollback(self) -> None:
        for action, container, key, old in reversed(self.undo or ()):
            if action == _RESTORE_MEMBER:
                members = cast(dict[str, object], container)
                if old is MISSING:
                    del members[cast(str, key)]
                else:
                    members[cast(str, key)] = old
            elif action == _UNDO_INSERT:
                del cast(list[object], container)[cast(int, key)]
            elif action == _UNDO_DELETE:
                cast(list[object], container).insert(cast(int, key), old)
            else:
                cast(list[object], container)[cast(int, key)] = old
        self.undo = []

    def get(self, tokens: list[str], op: _Op) -> object:
        node = self.root
        for depth, token in enumerate(tokens):
            node = self.child(node, token, tokens, depth, op)
        return node

    def parent(self, tokens: list[str], op: _Op) -> object:
        """The container the last token names a member of, about to be changed."""
        if self.owned is not None:
            return self.own_parent(tokens, op)
        node = self.root
        for depth in range(len(tokens) - 1):
            node = self.child(node, tokens[depth], tokens, depth, op)
        return node

    def own_parent(self, tokens: list[str], op: _Op) -> object:
        """:meth:`parent`, copying each shared container on the way (``share=True``)."""
        node = self.root = self.own(self.root)
        for depth in range(len(tokens) - 1):
            token = tokens[depth]
            found = self.child(node, token, tokens, depth, op)
            mine = self.own(found)
            if mine is not found:  # node is a container of ours: child() found a member of it
                if isinstance(node, dict):
                    node[token] = mine
                else:
                    cast(list[object], node)[cast(int, _array_index(token))] = mine
            node = mine
        return node

    def own(self, node: object) -> object:
        """``node`` if it is a scalar or already this patcher's, else a shallow copy of it."""
        owned = cast(dict[int, object], self.owned)
        if id(node) in owned:
            return node
        if isinstance(node, dict):
            mine: object = dict(node)
        elif isinstance(node, list):
            mine = list(node)
        else:
            return node
        owned[id(mine)] = mine
        return mine

    def child(self, node: object, token: str, tokens: list[str], depth: int, op: _Op) -> object:
        if isinstance(node, dict):
            found = node.get(token, MISSING)
            if found is MISSING:
                raise op.failed(f"{pointer(tokens[: depth + 1])!r} does not exist")
            return found
        if isinstance(node, list):
            return node[self.index(node, token, tokens, depth, op)]
        raise op.failed(f"{pointer(tokens[:depth])!r} is a scalar: it has no {token!r}")

    def index(self, array: list[object], token: str, tokens: list[str], depth: int, op: _Op) -> int:
        """The existing element ``token`` names in ``array``."""
        position = _array_index(token)
        if position is None:
            raise op.failed(f"{token!r} is not an array index (at {pointer(tokens[:depth])!r})")
        if position >= len(array):
            raise op.failed(f"{pointer(tokens[: depth + 1])!r} is past the end of the array")
        return position

    def add(self, tokens: list[str], value: object, op: _Op) -> None:
        if not tokens:
            self.root = value
            return
        parent = self.parent(tokens, op)
        last = tokens[-1]
        if isinstance(parent, dict):
            self.log((_RESTORE_MEMBER, parent, last, parent.get(last, MISSING)))
            parent[last] = value
        elif isinstance(parent, list):
            if last == "-":
                position: int | None = len(parent)
            else:
                position = _array_index(last)
                if position is None:
                    raise op.failed(f"{last!r} is not an array index")
                if position > len(parent):
                    raise op.failed(f"{pointer(tokens)!r} is past the end of the array")
            limits = self.checker.limits
            if limits is not None and len(parent) >= limits.max_array_length:
                raise PatchLimitExceeded(
                    f"the array at {pointer(tokens[:-1])!r} would exceed "
                    f"{limits.max_array_length} elements",
                    limit="max_array_length",
                    value=len(parent) + 1,
                    maximum=limits.max_array_length,
                    op_index=op.index,
                    op=op.raw,
                )
            parent.insert(cast(int, position), value)
            self.log((_UNDO_INSERT, parent, position, None))
        else:
            raise op.failed(f"{pointer(tokens[:-1])!r} is a scalar: cannot add a member to it")

    def remove(self, tokens: list[str], op: _Op) -> object:
        if not tokens:
            raise op.failed("cannot remove the whole document")
        parent = self.parent(tokens, op)
        last = tokens[-1]
        if isinstance(parent, dict):
            old = parent.pop(last, MISSING)
            if old is MISSING:
                raise op.failed(f"{pointer(tokens)!r} does not exist")
            self.log((_RESTORE_MEMBER, parent, last, old))
            return old
        if isinstance(parent, list):
            position = self.index(parent, last, tokens, len(tokens) - 1, op)
            old = parent.pop(position)
            self.log((_UNDO_DELETE, parent, position, old))
            return old
        raise op.failed(f"{pointer(tokens[:-1])!r} is {_type_name(parent)}: nothing to remove")

    def replace(self, tokens: list[str], value: object, op: _Op) -> None:
        if not tokens:
            self.root = value
            return
        parent = self.parent(tokens, op)
        last = tokens[-1]
        if isinstance(parent, dict):
            old = parent.get(last, MISSING)
            if old is MISSING:
                raise op.failed(f"{pointer(tokens)!r} does not exist")
            self.log((_RESTORE_MEMBER, parent, last, old))
            parent[last] = value
        elif isinstance(parent, list):
            position = self.index(parent, last, tokens, len(tokens) - 1, op)
            self.log((_UNDO_SET, parent, position, parent[position]))
            parent[position] = value
        else:
            raise op.failed(f"{pointer(tokens[:-1])!r} is a scalar: nothing to replace")

    def move(self, source: list[str], target: list[str], op: _Op) -> None:
        if source == target:
            self.get(source, op)  # moving a value onto itself changes nothing, if it exists
            return
        value = self.remove(source, op)
        limits = self.checker.limits
        if len(target) > len(source) and limits is not None:  # it may nest too deep there
            depth = _depth(value, len(target), limits.max_depth)
            if depth > limits.max_depth:
                raise self.checker.too_deep(depth, op.index, op.raw)
        self.add(target, value, op)


def _depth(value: object, depth: int, maximum: int) -> int:
    """How deep ``value`` nests below ``depth`` levels; stops counting past ``maximum``."""
    deepest = depth
    stack = [(value, depth)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, (dict, list)):
            level += 1
            deepest = max(deepest, level)
            if deepest > maximum:
                return deepest
            items = node.values() if isinstance(node, dict) else node
            stack.extend((item, level) for item in items if isinstance(item, (dict, list)))
    return deepest


def _checked(
    patch: object, limits: PatchLimits | None, *, trusted: bool = False
) -> tuple[_Checker, list[_Op]]:
    checker = _Checker(limits, trusted=trusted)
    return checker, checker.parse(patch)


def validate_patch(
    patch: object, *, limits: PatchLimits | None = DEFAULT_LIMITS
) -> list[dict[str, object]]:
    """Check a patch without a document: shape, operations, pointers, values and limits.

    Everything that can be known without the document is checked (``apply_patch`` checks the
    same first): the patch is an array of objects; each has a known ``op``, string pointers in
    RFC 6901 syntax, the ``value`` or ``from`` its operation needs; ``move`` is not into its own
    child; values are JSON (no NaN or infinity, string member names) within ``limits``; every
    string, member name and pointer is valid Unicode (no lone surrogate, which nothing can
    store); members an operation ignores are JSON too (a history stores them).

    Args:
        patch: the parsed request body, as received.
        limits: the bounds to enforce, or ``None`` for none.

    Returns:
        The same operations, now known to be a list of JSON objects.

    Raises:
        InvalidPatch: the patch is malformed (HTTP 422).
        PatchLimitExceeded: the patch is over a limit (HTTP 413).
    """
    _checked(patch, limits)
    return list(cast(list[dict[str, object]], patch))


def apply_patch(
    doc: DocT,
    patch: object,
    *,
    limits: PatchLimits | None = DEFAULT_LIMITS,
    in_place: bool = False,
    share: bool = False,
) -> DocT:
    """Apply a JSON Patch (RFC 6902) atomically: all operations, or none.

    The patch is validated whole first. Then, by default, the document is deep-copied and the
    copy patched, so ``doc`` is never changed. With ``in_place=True`` there is no copy:
    ``doc``'s containers are changed directly (use the returned value: a patch may replace the
    whole document), and if an operation fails every change already made is undone before the
    error is raised. With ``share=True`` only the containers on the changed paths are copied
    (shallowly: one edit of a 10,000-block page copies the list of blocks and that block, not
    the page), and the result shares every other value with ``doc``: ``doc`` is never changed,
    but from then on treat both as values (change neither in place). Values from the patch are
    copied into the document, so later changes to either never show in the other.

    Array indices follow RFC 6901 strictly (``0``, ``1``...; no ``01``, no ``-1``); ``-`` is
    the end of an array for ``add`` (and ``move``/``copy`` targets) only. ``test`` compares as
    RFC 6902 §4.6 says: numbers by value, ``true`` never equal to ``1``, members in any order.

    The return type is the input's: a patch replacing the whole document with another kind of
    value (``{"op": "replace", "path": "", ...}``) returns that value.

    Args:
        doc: the JSON document (as ``json.loads`` returns it).
        patch: the operations, as received (anything; it is validated).
        limits: the resource bounds, or ``None`` for none (trusted patches only).
        in_place: patch ``doc`` itself, undoing everything on failure.
        share: copy on write: copy only what the patch changes; the result shares the rest
            with ``doc``.

    Returns:
        The patched document.

    Raises:
        InvalidPatch: the patch is malformed (HTTP 422).
        PatchLimitExceeded: the patch, or what it builds, is over a limit (HTTP 413).
        PatchApplyError: an operation does not apply: a missing path, an index past the end,
            a member of a scalar... (HTTP 422).
        PatchTestFailed: a ``test`` operation did not hold (HTTP 409).
        ConfigurationError: both ``in_place`` and ``share``.
    """
    if in_place and share:
        raise ConfigurationError("apply_patch: in_place and share exclude each other")
    checker, ops = _checked(patch, limits)
    root: object = doc
    if not in_place and not share:
        try:
            root = copy_json(doc)
        except RecursionError:
            raise checker.too_deep(_DEPTH_CAP + 1, None, None) from None
    patcher = _Patcher(root, checker, undo=in_place, share=share)
    try:
        for op in ops:
            patcher.run(op)
    except PatchError:
        patcher.rollback()
        raise
    except RecursionError:  # comparing or copying a document nested past the interpreter
        patcher.rollback()
        raise checker.too_deep(_DEPTH_CAP + 1, None, None) from None
    return cast(DocT, patcher.root)


def apply_trusted(doc: object, patch: object) -> object:
    """Apply a stored patch in place, without limits, copies or undo (replaying history).

    ``doc`` must be a private copy: on failure it is left half-patched.
    """
    checker, ops = _checked(patch, None, trusted=True)
    patcher = _Patcher(doc, checker, undo=False, copy_values=False)
    for op in ops:
        patcher.run(op)
    return patcher.root


def patch_size(patch: object) -> int:
    """The patch's size in bytes as compact JSON (what ``max_bytes`` approximates)."""
    return len(json.dumps(patch, separators=(",", ":"), ensure_ascii=False).encode())
