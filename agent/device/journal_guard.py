"""Hold the journal to its witness: judge the two once, then let the witness follow the journal.

The judgement is ``agent.core.witness.judge``, the file and its MAC key
``agent.adapters.witness``. The updater asks ``lost()`` before it acts on the journal: None
when the journal is the one the witness knows (from then on every commit that changes a
witnessed fact is copied to the witness), else the ``JournalLost`` to refuse with until
``edgeops journal recover`` (``agent.device.recovery``). ``witnessed`` is the record the
witness held, whose floor and time still count while the journal is lost.
"""

from __future__ import annotations

from collections.abc import Callable

from agent.adapters.journal import Journal
from agent.adapters.witness import SealsSecrets, WitnessFile, witness_key
from agent.core import witness as witness_core
from agent.core.config import AgentConfig
from agent.errors import JournalLost


class JournalGuard:
    def __init__(self, cfg: AgentConfig, journal: Journal,
                 root: Callable[[], SealsSecrets | None]) -> None:
        self.cfg, self.journal, self._root = cfg, journal, root
        self._witness: WitnessFile | None = None
        self._finding: witness_core.Finding | None = None
        self.witnessed: witness_core.Record | None = None

    def witness(self) -> WitnessFile:
        """The witness file, keyed by the root of trust when the device has one (opened once)."""
        if self._witness is None:
            self._witness = WitnessFile(self.cfg.witness_path, witness_key(self._root()))
        return self._witness

    def finding(self, *, again: bool = False) -> witness_core.Finding:
        """The judgement, made once (``again``: now, as the files are)."""
        if self._finding is None or again:
            self._finding = self._judge()
        return self._finding

    def lost(self) -> JournalLost | None:
        finding = self.finding()
        if finding.verdict != "lost":
            return None
        return JournalLost(f"journal {self.journal.path} does not match its witness: {finding.reason}")

    def _judge(self) -> witness_core.Finding:
        w = self.witness()
        try:
            got, damaged = w.read(), None
        except witness_core.WitnessDamaged as exc:
            got, damaged = None, str(exc)
        self.witnessed = got[0] if got else None
        finding = witness_core.judge(self.journal.facts(), fresh=self.journal.fresh,
                                     witness=self.witnessed, damaged=damaged,
                                     keyed=got[1] if got else True, root_key=w.key is not None)
        if finding.verdict != "lost":
            self.journal.follow(w.write)
            if finding.verdict == "refresh":
                w.write(self.journal.facts())
        return finding


__all__ = ["JournalGuard"]
