"""agent.core.frozen.Frozen behaves as @dataclass(frozen=True) does, for what the records use."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path
from typing import Any, ClassVar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core.frozen import Frozen, FrozenInstanceError, field

ROOT = Path(__file__).resolve().parent.parent


class Point(Frozen):
    x: int
    y: int = 0
    note: str = ""
    LIMIT: ClassVar[int] = 9


class Other(Frozen):
    x: int
    y: int = 0
    note: str = ""


class Bag(Frozen):
    items: list[int] = field(default_factory=list)


class Named(Frozen):
    kind: str
    name: str = ""

    def __post_init__(self) -> None:
        if not self.name:
            object.__setattr__(self, "name", f"{self.kind}!")


class Mutable(Frozen, frozen=False):
    a: int
    b: list[str] = field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class DPoint:
    x: int
    y: int = 0
    note: str = ""


def test_positional_keyword_and_default_arguments_fill_the_fields() -> None:
    assert (Point(1).x, Point(1).y, Point(1, 2).y, Point(x=3, note="n").note) == (1, 0, 2, "n")


@pytest.mark.parametrize("args, kwargs", [((), {}), ((1, 2, "n", 4), {}), ((1,), {"x": 2}),
                                          ((1,), {"z": 2})])
def test_wrong_arguments_are_a_type_error(args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    with pytest.raises(TypeError):
        Point(*args, **kwargs)


@given(st.integers(), st.integers(), st.text(max_size=5))
def test_repr_equality_and_hash_are_the_dataclass_ones(x: int, y: int, note: str) -> None:
    p, d = Point(x, y, note), DPoint(x, y, note)
    assert repr(p).replace("Point", "DPoint", 1) == repr(d)
    assert p == Point(x, y, note) and hash(p) == hash(Point(x, y, note))
    assert (p == Point(x, y + 1, note)) is False


def test_equal_fields_of_another_class_are_not_equal() -> None:
    assert Point(1) != Other(1)
    assert Point(1) != (1, 0, "")


def test_assigning_or_deleting_a_field_raises() -> None:
    p = Point(1)
    with pytest.raises(FrozenInstanceError):
        p.x = 2  # type: ignore[misc]
    with pytest.raises(FrozenInstanceError):
        del p.x  # type: ignore[misc]
    assert isinstance(FrozenInstanceError("x"), AttributeError)


def test_a_factory_default_is_made_anew_for_each_instance() -> None:
    a, b = Bag(), Bag()
    a.items.append(1)
    assert b.items == []


def test_post_init_may_set_a_field() -> None:
    assert Named("http").name == "http!"
    assert Named("http", "mine").name == "mine"


def test_a_mutable_record_takes_assignment_and_has_no_hash() -> None:
    m = Mutable(1)
    m.a = 2
    assert m == Mutable(2) and m.b == []
    with pytest.raises(TypeError):
        hash(m)


def test_class_variables_are_not_fields() -> None:
    assert Point._fields == ("x", "y", "note") and Point.LIMIT == 9


def test_match_class_patterns_take_positions() -> None:
    match Point(4, 5):
        case Point(a, b):
            assert (a, b) == (4, 5)
        case _:
            pytest.fail("no match")


def test_a_field_without_default_after_a_default_is_refused() -> None:
    with pytest.raises(TypeError):
        class Bad(Frozen):
            a: int = 0
            b: int


def test_install_path_modules_import_no_dataclasses() -> None:
    code = ("import sys\nimport agent.device.updater, agent.adapters.bundle, agent.adapters.slots, "
            "agent.adapters.truststore, agent.core.plan\n"
            "print(sorted(m for m in ('dataclasses', 'inspect') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=ROOT).stdout.strip()
    assert out == "[]"


def test_dataclasses_replace_fields_and_asdict_work_on_a_record() -> None:
    p = Point(1, 2, "n")
    assert dataclasses.replace(p, y=5) == Point(1, 5, "n")
    assert [f.name for f in dataclasses.fields(p)] == ["x", "y", "note"]
    assert dataclasses.asdict(Bag([1])) == {"items": [1]} and dataclasses.is_dataclass(p)
    assert dataclasses.replace(Bag()).items == []


def test_asking_the_base_class_for_its_fields_leaves_its_subclasses_theirs() -> None:
    assert dataclasses.fields(Frozen) == ()  # type: ignore[arg-type]

    class Late(Frozen):
        a: int

    assert [f.name for f in dataclasses.fields(Late(1))] == ["a"]
