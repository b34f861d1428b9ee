"""What an app function's type hints say about the values it takes and
returns, in a form the XML protocols can use.

XML-RPC and SOAP carry typed values, so the hints of an exported function
decide its XML-RPC ``system.methodSignature`` and its SOAP schema, and turn
what arrives (an XML-RPC struct, a SOAP element) into what the function
expects (a dataclass, a Decimal, a date).  JSON-RPC does not need any of this.

Understood hints: ``str int float bool bytes datetime date Decimal``,
``list[T]`` (also ``tuple[T, ...]``, ``Sequence[T]``), ``T | None`` /
``Optional[T]``, dataclasses and TypedDicts (structures, nested or not).
Anything else (no hint, ``Any``, ``dict``, other unions) is ``any``; a
``dict`` (or ``Mapping``) is an ``any`` whose ``cls`` is ``dict``: its members
are untyped, but it is a mapping (an XML-RPC struct).
"""

from __future__ import annotations

import collections.abc
import dataclasses
import datetime
import decimal
import inspect
import types
import typing
from dataclasses import dataclass, field

from msgd.core import errors

SCALARS: dict[type, str] = {
    bool: "bool", int: "int", float: "float", str: "str", bytes: "bytes",
    datetime.datetime: "datetime", datetime.date: "date", decimal.Decimal: "decimal",
}


@dataclass(eq=False)
class Type:
    """``kind`` is a scalar kind (see :data:`SCALARS`), ``list`` (of
    ``item``), ``struct`` (``cls`` with ``fields``), ``none`` (a function
    that returns nothing) or ``any`` (``cls`` is ``dict`` for a mapping)."""

    kind: str
    optional: bool = False
    item: "Type | None" = None
    cls: type | None = None
    fields: list["Field"] = field(default_factory=list)

    @property
    def name(self) -> str:
        return self.cls.__name__ if self.cls is not None else self.kind


@dataclass(eq=False)
class Field:
    name: str
    type: Type
    required: bool = True


@dataclass(eq=False)
class Signature:
    params: list[Field]
    result: Type
    doc: str


def model(hint, _seen: dict | None = None) -> Type:
    """The :class:`Type` of a type hint."""
    seen = {} if _seen is None else _seen
    if hint is None or hint is type(None):
        return Type("none")
    if hint in SCALARS:
        return Type(SCALARS[hint])
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        if len(rest) == 1 and len(args) == 2:
            # a copy: struct Types are shared; the copy shares the field list,
            # filled in later for a struct still being built (recursion)
            return dataclasses.replace(model(rest[0], seen), optional=True)
        return Type("any")
    if origin in (list, tuple, set, frozenset, collections.abc.Sequence, collections.abc.Iterable):
        if origin is tuple and not (len(args) == 2 and args[1] is Ellipsis):
            return Type("any")
        return Type("list", item=model(args[0], seen) if args else Type("any"))
    if hint is list:
        return Type("list", item=Type("any"))
    if hint is dict or origin in (dict, collections.abc.Mapping, collections.abc.MutableMapping):
        return Type("any", cls=dict)
    if inspect.isclass(hint) and (dataclasses.is_dataclass(hint) or typing.is_typeddict(hint)):
        if hint in seen:
            return seen[hint]
        t = seen[hint] = Type("struct", cls=hint)
        hints = typing.get_type_hints(hint)
        if dataclasses.is_dataclass(hint):
            for f in dataclasses.fields(hint):
                has_default = f.default is not dataclasses.MISSING or f.default_factory is not dataclasses.MISSING
                t.fields.append(Field(f.name, model(hints.get(f.name), seen), not has_default))
        else:
            required = getattr(hint, "__required_keys__", frozenset(hints))
            for name, h in hints.items():
                t.fields.append(Field(name, model(h, seen), name in required))
        return t
    return Type("any")


def signature(fn) -> Signature:
    """Parameters (without ``*args``/``**kwargs``) and result of ``fn``."""
    try:
        hints = typing.get_type_hints(fn)
    except Exception:
        hints = {}
    seen: dict = {}
    params = []
    for name, p in inspect.signature(fn).parameters.items():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        params.append(Field(name, model(hints[name], seen) if name in hints else Type("any"),
                            p.default is inspect.Parameter.empty))
    result = model(hints["return"], seen) if "return" in hints else Type("any")
    return Signature(params, result, inspect.getdoc(fn) or "")


def needs_coercion(t: Type) -> bool:
    """Whether a decoded value may need :func:`coerce` to fit ``t``."""
    return t.kind in ("decimal", "date", "float", "struct") or (t.kind == "list" and t.item is not None
                                                                 and needs_coercion(t.item))


def coerce(value, t: Type, where: str):
    """``value`` as decoded by a protocol, turned into what a parameter of
    type ``t`` expects: structs into their dataclass, numbers and strings into
    Decimal, datetimes into dates.  Values that already fit pass through;
    the dispatcher checks the rest.  Raises InvalidParams naming ``where``."""
    if value is None or t.kind == "any":
        return value
    k = t.kind
    try:
        if k == "decimal" and isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return decimal.Decimal(str(value))
        if k == "date" and isinstance(value, datetime.datetime):
            return value.date()
        if k == "float" and isinstance(value, int) and not isinstance(value, bool):
            return float(value)
        if k == "list" and isinstance(value, (list, tuple)):
            assert t.item is not None    # a list type always has its item type
            return [coerce(v, t.item, f"{where}[{i}]") for i, v in enumerate(value)]
        if k == "struct" and isinstance(value, dict):
            return build_struct(t, {f.name: coerce(value[f.name], f.type, f"{where}.{f.name}")
                                    for f in t.fields if f.name in value}, where,
                                extra=set(value) - {f.name for f in t.fields})
    except decimal.InvalidOperation:
        raise errors.InvalidParams(f"{where}: {value!r} is not a decimal number") from None
    return value


def build_struct(t: Type, values: dict, where: str, extra=()):
    """An instance of the struct ``t`` (a dataclass or a TypedDict's dict)."""
    if extra:
        raise errors.InvalidParams(f"{where}: unknown member(s) {', '.join(sorted(extra))} of {t.name}")
    missing = [f.name for f in t.fields if f.required and f.name not in values]
    if missing:
        raise errors.InvalidParams(f"{where}: {t.name} lacks {', '.join(missing)}")
    if dataclasses.is_dataclass(t.cls):
        return t.cls(**values)
    return dict(values)


def members(value) -> dict:
    """The members of a structure to send: a dataclass's fields or a dict."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: getattr(value, f.name) for f in dataclasses.fields(value)}
    return value
