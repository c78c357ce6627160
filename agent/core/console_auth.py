"""Technician PIN and lockout policy for the console: the slow hash, its record, the back-off. Pure.

The PIN is kept only as scrypt (``hashlib.scrypt``, RFC 7914) with a random salt; the record
names its parameters, so a later release can raise them and still read old records. The
lockout is a small state (failures, locked until) that the caller persists after every
attempt, so restarting the console (or the device) does not reset it. The salt, the clock
and the storage are passed in.

Parameters: N=2**14, r=8, p=1 is the interactive-login setting of RFC 7914 §2 and of
Python's own docs (16 MiB, tens of milliseconds on a Cortex-A72); a brute force of a
6-digit PIN then costs hours per device even with the file in hand, and the lockout stops
one at the port long before.
"""

from __future__ import annotations

import hashlib
import hmac
import itertools
import json
from dataclasses import asdict, dataclass

from agent.errors import ConfigError, UsageError

SCRYPT_N, SCRYPT_R, SCRYPT_P = 2**14, 8, 1
MAX_SCRYPT_N = 2**20  # a record asking for more is refused: the file is input too
SALT_BYTES = 16
MIN_PIN, MAX_PIN = 6, 32
FREE_FAILURES = 3  # failures before any wait
BASE_DELAY = 30.0  # seconds after the first failure past the free ones, doubling
MAX_DELAY = 3600.0


@dataclass(frozen=True)
class PinRecord:
    salt: bytes
    digest: bytes
    n: int = SCRYPT_N
    r: int = SCRYPT_R
    p: int = SCRYPT_P

    def to_json(self) -> str:
        return json.dumps({"v": 1, "kdf": "scrypt", "n": self.n, "r": self.r, "p": self.p,
                           "salt": self.salt.hex(), "hash": self.digest.hex()}) + "\n"

    @classmethod
    def from_json(cls, text: str, where: str) -> PinRecord:
        try:
            d = json.loads(text)
            rec = cls(bytes.fromhex(d["salt"]), bytes.fromhex(d["hash"]), int(d["n"]),
                      int(d["r"]), int(d["p"]))
            ok = d.get("v") == 1 and d.get("kdf") == "scrypt"
        except (ValueError, KeyError, TypeError):
            ok = False
        if not ok or not (2 <= rec.n <= MAX_SCRYPT_N and rec.n & (rec.n - 1) == 0
                          and 1 <= rec.r <= 32 and 1 <= rec.p <= 4 and len(rec.digest) == 32
                          and len(rec.salt) >= 8):
            raise ConfigError(f"{where}: not a console PIN record",
                              hint="set the PIN again with 'edgeops console set-pin'")
        return rec


def check_pin_policy(pin: str) -> None:
    """A PIN is 6 to 32 digits (a serial keypad or a laptop both type those), not all one digit
    nor a plain run such as 123456."""
    if not pin.isdigit() or not pin.isascii():
        raise UsageError("a technician PIN is digits only", hint=f"choose {MIN_PIN}-{MAX_PIN} digits")
    if not MIN_PIN <= len(pin) <= MAX_PIN:
        raise UsageError(f"a technician PIN has {MIN_PIN} to {MAX_PIN} digits, this one {len(pin)}",
                         hint=f"choose {MIN_PIN}-{MAX_PIN} digits")
    steps = {(int(b) - int(a)) % 10 for a, b in itertools.pairwise(pin)}
    if steps in ({0}, {1}, {9}):
        raise UsageError("that PIN is a repeated digit or a plain run", hint="choose another PIN")


def hash_pin(pin: str, salt: bytes, *, n: int = SCRYPT_N, r: int = SCRYPT_R, p: int = SCRYPT_P
             ) -> PinRecord:
    check_pin_policy(pin)
    return PinRecord(salt, _kdf(pin, salt, n, r, p), n, r, p)


def pin_matches(record: PinRecord, pin: str) -> bool:
    if not pin.isascii() or len(pin) > MAX_PIN:  # bounded before the slow hash is spent on it
        return False
    return hmac.compare_digest(_kdf(pin, record.salt, record.n, record.r, record.p), record.digest)


def _kdf(pin: str, salt: bytes, n: int, r: int, p: int) -> bytes:
    return hashlib.scrypt(pin.encode(), salt=salt, n=n, r=r, p=p, maxmem=256 * 1024 * 1024,
                          dklen=32)


# --- lockout -------------------------------------------------------------------------------
@dataclass(frozen=True)
class Lockout:
    failures: int = 0
    locked_until: float = 0.0  # wall clock seconds

    def to_dict(self) -> dict[str, float]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: object) -> Lockout:
        """A damaged record counts as locked for the longest wait (fail closed), not as none."""
        if d is None:
            return cls()
        try:
            assert isinstance(d, dict)
            return cls(max(0, int(d["failures"])), float(d["locked_until"]))
        except (AssertionError, KeyError, TypeError, ValueError):
            return cls(FREE_FAILURES + 8, float("inf"))


def delay_after(failures: int) -> float:
    """Seconds to wait after ``failures`` consecutive failures: none for the first
    ``FREE_FAILURES``, then 30 s doubling up to an hour."""
    if failures < FREE_FAILURES:
        return 0.0
    return float(min(MAX_DELAY, BASE_DELAY * 2 ** min(failures - FREE_FAILURES, 20)))


def after_failure(state: Lockout, now: float) -> Lockout:
    failures = state.failures + 1
    return Lockout(failures, now + delay_after(failures))


def after_success(state: Lockout) -> Lockout:
    return Lockout()


def wait_left(state: Lockout, now: float) -> tuple[Lockout, float]:
    """The state to keep and the seconds until the next attempt may be made (0: now).

    A wait never exceeds ``MAX_DELAY`` from ``now``: a clock set back (or a damaged record,
    read as locked) is clamped, and the clamped state is what the caller stores, so the
    longest lockout is an hour whatever the clock did."""
    if state.locked_until > now + MAX_DELAY:
        state = Lockout(state.failures, now + MAX_DELAY)
    return state, max(0.0, state.locked_until - now)
