"""agent.core.witness: the record format, the judgement of a journal against it, and recovery."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from agent.core import witness as w
from agent.core.lifecycle import Phase, State

KEY = b"k" * 32
J = w.Record("aaaa1111", 8, 3, 1_700_000_000, State().to_dict(),
             {"A": {"state": "good", "version": "1.0", "security_version": 0},
              "B": {"state": "good", "version": "3.0", "security_version": 3}})


@pytest.mark.parametrize("key", [None, KEY])
def test_a_record_round_trips(key: bytes | None) -> None:
    rec, keyed = w.decode(w.encode(J, key), key)
    assert rec == J and keyed is (key is not None)


@pytest.mark.parametrize("blob, key, words", [
    (b"", None, "malformed"),
    (b"[]", None, "not an edgeops-witness/1 record"),
    (b'{"format": "edgeops-witness/1"}', None, "malformed"),
    (w.encode(J, KEY), None, "keyed by a root of trust this device does not open"),
    (w.encode(J, KEY), b"x" * 32, "MAC does not verify"),
    (w.encode(J, None).replace(b'"security_floor": 3', b'"security_floor": 0'), None,
     "MAC does not verify"),
    (w.encode(J._replace(security_floor=-1), None), None, "malformed"),
    (w.encode(J._replace(state={"phase": "dancing"}), None), None, "malformed"),
    (b" " * (w.MAX_BYTES + 1), None, "more than a witness record holds"),
])
def test_damage_is_refused(blob: bytes, key: bytes | None, words: str) -> None:
    with pytest.raises(w.WitnessDamaged, match=words):
        w.decode(blob, key)


def test_an_unkeyed_record_is_read_on_a_device_that_now_has_a_root() -> None:
    rec, keyed = w.decode(w.encode(J, None), KEY)
    assert rec == J and not keyed


def test_the_mac_covers_whether_it_is_keyed() -> None:
    doc = json.loads(w.encode(J, None))
    doc["keyed"] = True  # claiming a key it never had cannot make an unkeyed MAC verify
    with pytest.raises(w.WitnessDamaged):
        w.decode(json.dumps(doc).encode(), KEY)


# --- judge: every case, as a table ----------------------------------------------------------
OLDER = J._replace(generation=5, security_floor=0)
TESTING = J._replace(generation=9, state=State(Phase.TESTING, "A", "B", "4.0", 4, "b1", 1).to_dict())


@pytest.mark.parametrize("journal, kw, verdict, words", [
    (J, {"witness": J}, "ok", "matches"),
    (TESTING, {"witness": J}, "refresh", "catches up"),  # a power cut between the two writes
    (J._replace(generation=20), {"witness": J}, "refresh", "catches up"),  # a model raised the time
    (J, {"witness": J, "keyed": False, "root_key": True}, "refresh", "keyed by the root of trust"),
    (J, {"witness": None}, "refresh", "first witness"),  # an older agent's journal
    (J._replace(generation=0), {"witness": None, "fresh": True}, "refresh", "first witness"),  # new device
    (J._replace(journal_id="bbbb", generation=0, security_floor=0), {"witness": J, "fresh": True},
     "lost", "lost or emptied"),
    (J._replace(journal_id="bbbb"), {"witness": J}, "lost", "re-created or replaced"),
    (OLDER, {"witness": J}, "lost", "older copy of itself"),
    (J._replace(generation=9, security_floor=2), {"witness": J}, "lost", "below its witness"),
    (J._replace(generation=9, trusted_time=5), {"witness": J}, "lost", "below its witness"),
    (J, {"witness": None, "damaged": "its MAC does not verify"}, "lost", "witness is damaged"),
])
def test_judge(journal: w.Record, kw: dict[str, object], verdict: str, words: str) -> None:
    args: dict[str, object] = {"fresh": False, **kw}
    finding = w.judge(journal, **args)  # type: ignore[arg-type]
    assert finding.verdict == verdict and words in finding.reason


def test_a_lost_journal_is_named_with_what_the_witness_knows() -> None:
    f = w.judge(J._replace(journal_id="bbbb", generation=0), fresh=True, witness=J)
    assert "journal aaaa1111 at generation 8 with floor 3" in f.reason


# --- recovered: never lower -----------------------------------------------------------------
FALLBACK = w.Record("cccc", 0, 0, 0, State().to_dict(), {"B": {"state": "good", "version": None,
                                                                 "security_version": None}})


def test_recovery_takes_slots_and_state_from_the_witness() -> None:
    rec = w.recovered(TESTING, journal=J._replace(journal_id="x", security_floor=0), root_floor=None,
                      fallback=FALLBACK)
    assert rec.state == TESTING.state and rec.slots == TESTING.slots and rec.security_floor == 3


def test_recovery_without_a_witness_uses_the_old_journal_then_the_bootloader() -> None:
    assert w.recovered(None, journal=J, root_floor=None, fallback=FALLBACK).slots == J.slots
    assert w.recovered(None, journal=None, root_floor=7, fallback=FALLBACK) == FALLBACK._replace(
                                                                                      security_floor=7)


records = st.builds(w.Record, st.text(min_size=1, max_size=4), st.integers(0, 50), st.integers(0, 99),
                    st.integers(0, 2**40), st.just(State().to_dict()), st.just({}))


@given(records, st.none() | records, st.none() | st.integers(0, 99), records)
def test_recovery_never_lowers_the_floor_or_the_time(witness: w.Record, journal: w.Record | None,
                                                     root_floor: int | None, fallback: w.Record) -> None:
    rec = w.recovered(witness, journal=journal, root_floor=root_floor, fallback=fallback)
    sources = [witness, fallback, *([journal] if journal else [])]
    assert rec.security_floor >= max([s.security_floor for s in sources] + [root_floor or 0])
    assert rec.trusted_time >= max(s.trusted_time for s in sources)
