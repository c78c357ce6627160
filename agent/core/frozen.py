"""Record classes with what ``@dataclass(frozen=True)`` gives, minus its cost at import. Pure.

Python 3.11's ``dataclasses`` writes each generated method as source and ``exec``-compiles
it when the class is created: ~4 M instructions per class (tools/bench/startup.py), plus
~34 M to import ``dataclasses`` (and ``inspect``, ``ast``, ``dis``, ``tokenize``) at all.
``edgeops install`` created 47 of them before its first byte (docs/performance.md). A
``Frozen`` subclass gets the same behaviour from methods written once, here:

- construction by position or keyword, defaults, ``field(default_factory=...)``, and
  ``__post_init__`` (which may set fields with ``object.__setattr__``, as for a dataclass);
- value equality with instances of the very same class only, ``__hash__`` over the fields
  (none for a mutable class, as ``eq=True`` without ``frozen`` gives), the dataclass
  ``repr``, and ``__match_args__`` for ``match`` class patterns;
- immutability: assigning or deleting an attribute raises ``FrozenInstanceError``
  (``class X(Frozen, frozen=False)`` for a mutable record).

Fields are the class's own annotations, in order (``ClassVar`` ones excluded); subclassing
a record is not supported (no record here needs it). Type checkers treat subclasses as
dataclasses (PEP 681, ``typing.dataclass_transform``), and so does ``dataclasses`` itself:
``dataclasses.replace``, ``fields``, ``asdict`` and ``is_dataclass`` (pytest's assertion
diff uses it) find ``__dataclass_fields__``, built on first use, which is the one moment
``dataclasses`` gets imported.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar, TypeVar, dataclass_transform

T = TypeVar("T")


class FrozenInstanceError(AttributeError):
    """An attribute of a frozen record was assigned or deleted (as ``dataclasses``' error)."""


class _Factory:
    __slots__ = ("make",)

    def __init__(self, make: Callable[[], Any]) -> None:
        self.make = make


def field(*, default_factory: Callable[[], T]) -> T:
    """A default made anew for each instance (a list, a dict), as ``dataclasses.field``."""
    return _Factory(default_factory)  # type: ignore[return-value]  # read back by Frozen.__init__


class _DataclassFields:
    """``__dataclass_fields__`` of a record class, made on first access (imports dataclasses)."""

    def __get__(self, obj: object, cls: type[Frozen]) -> dict[str, Any]:
        import dataclasses

        fields: dict[str, Any] = {}
        if cls is Frozen:  # the base has no fields, and must keep the descriptor for its subclasses
            return fields
        for n in cls._fields:
            d = cls._defaults.get(n, dataclasses.MISSING)
            f = (dataclasses.field(default_factory=d.make) if isinstance(d, _Factory)
                 else dataclasses.field(default=d))
            f.name, f.type = n, cls.__annotations__[n]
            f._field_type = getattr(dataclasses, "_FIELD")  # noqa: B009 (what @dataclass sets)  # type: ignore[attr-defined]
            fields[n] = f
        type.__setattr__(cls, "__dataclass_fields__", fields)  # made once per class
        return fields


@dataclass_transform(frozen_default=True, field_specifiers=(field,))
class Frozen:
    __slots__ = ()
    __dataclass_fields__: ClassVar[Any] = _DataclassFields()
    _fields: ClassVar[tuple[str, ...]] = ()
    _defaults: ClassVar[dict[str, Any]] = {}
    _frozen: ClassVar[bool] = True

    def __init_subclass__(cls, *, frozen: bool = True, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        notes = cls.__dict__.get("__annotations__", {})  # noqa: RUF063 (inspect costs the import)
        names = tuple(n for n, t in notes.items() if not str(t).startswith(("ClassVar", "typing.ClassVar")))
        defaults = {n: cls.__dict__[n] for n in names if n in cls.__dict__}
        for n in names[next((i for i, n in enumerate(names) if n in defaults), len(names)):]:
            if n not in defaults:  # as dataclasses refuses it
                raise TypeError(f"non-default field {n!r} follows a default one in {cls.__name__}")
        for n, d in defaults.items():
            if isinstance(d, _Factory):
                delattr(cls, n)  # so that an instance without the field fails loudly, not quietly
        cls._fields, cls._defaults, cls._frozen = names, defaults, frozen
        setattr(cls, "__match_args__", names)  # noqa: B010 (the type checker makes its own)
        if not frozen:
            cls.__hash__ = None  # type: ignore[assignment]  # mutable and eq: unhashable

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        names = self._fields
        if len(args) > len(names):
            raise TypeError(f"{type(self).__name__}() takes {len(names)} arguments, got {len(args)}")
        values = dict(zip(names, args, strict=False))
        for key, value in kwargs.items():
            if key not in names:
                raise TypeError(f"{type(self).__name__}() got an unexpected argument {key!r}")
            if key in values:
                raise TypeError(f"{type(self).__name__}() got multiple values for {key!r}")
            values[key] = value
        if len(values) < len(names):
            for n in names:
                if n not in values:
                    if n not in self._defaults:
                        raise TypeError(f"{type(self).__name__}() missing argument {n!r}")
                    d = self._defaults[n]
                    values[n] = d.make() if isinstance(d, _Factory) else d
        own = object.__getattribute__(self, "__dict__")
        for n in names:  # in field order, as the dataclass __init__ assigns them
            own[n] = values[n]
        post = getattr(self, "__post_init__", None)
        if post is not None:
            post()

    def _values(self) -> tuple[Any, ...]:
        own = self.__dict__
        return tuple(own[n] for n in self._fields)

    def __eq__(self, other: object) -> bool:
        if other.__class__ is self.__class__:
            return self._values() == other._values()  # type: ignore[attr-defined]
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self._values())

    def __repr__(self) -> str:
        own = self.__dict__
        return f"{type(self).__qualname__}({', '.join(f'{n}={own[n]!r}' for n in self._fields)})"

    def __setattr__(self, name: str, value: Any) -> None:
        if self._frozen:
            raise FrozenInstanceError(f"cannot assign to field {name!r}")
        object.__setattr__(self, name, value)

    def __delattr__(self, name: str) -> None:
        if self._frozen:
            raise FrozenInstanceError(f"cannot delete field {name!r}")
        object.__delattr__(self, name)


__all__ = ["Frozen", "FrozenInstanceError", "field"]
