"""A Hypothesis state machine over the repository: devices written, backups (full and
incremental) begun and finished or aborted at any point, prune, gc mark and sweep in any
order between them. After every step no manifest names a missing chunk; every backup
still listed restores to the device's contents at its snapshot. (With the sweep blind
to leases, 300 examples find the lost chunk: a backup de-duplicating against an aborted
backup's chunk while gc marks and sweeps; the deterministic version of that race is in
``tests/test_repo.py``.)"""

from __future__ import annotations

import random
import uuid

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from shmblock.lineage import new_generation
from shmblock.repo.repository import Policy, Repository
from shmblock.repo.source import ManifestReader
from shmblock.repo.target import RepoTarget, job_target
from shmblock.repo.url import open_store, parse_repo_url

CS = 4096
CHUNK = 4 * CS
CLUSTERS = 4 * 5 + 2  # five whole chunks and a short one
DEVICES = ("d0", "d1")


def render(values: list[int]) -> bytes:
    """Cluster values → bytes: 0 is zeros; a few values, so chunks repeat (dedup)."""
    return b"".join(bytes([v]) * CS for v in values)


class RepoModel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.url = f"mem://{uuid.uuid4().hex}?chunk-size={CHUNK}"
        parsed = parse_repo_url(self.url)
        self.repo = Repository(open_store(parsed), parsed.repo)
        self.image = {d: [0] * CLUSTERS for d in DEVICES}
        self.dirty: dict[str, set[int]] = {d: set() for d in DEVICES}
        self.has_full = dict.fromkeys(DEVICES, False)
        self.open: dict[str, tuple[RepoTarget, list[int], set[int]]] = {}
        self.expected: dict[str, list[int]] = {}
        self._marked = False  # a condemned list is waiting for its sweep
        # bitmap b's lineage generation per device, as the engine keeps it
        # (shmblock.lineage), and the one a running backup would restore
        self.gen = {d: new_generation() for d in DEVICES}
        self.prior: dict[str, str] = {}

    @rule(dev=st.sampled_from(DEVICES), clusters=st.sets(st.integers(0, CLUSTERS - 1),
                                                         min_size=1, max_size=CLUSTERS),
          value=st.integers(0, 2))
    def write(self, dev: str, clusters: set[int], value: int) -> None:
        for c in clusters:
            self.image[dev][c] = value
        self.dirty[dev] |= clusters

    @rule(dev=st.sampled_from(DEVICES), incremental=st.booleans(), seed=st.integers(0, 9))
    def begin(self, dev: str, incremental: bool, seed: int) -> None:
        if dev in self.open or (incremental and not self.has_full[dev]):
            return
        sync = "incremental" if incremental else "full"
        minted = new_generation()
        target = job_target(f"{self.url}&device={dev}&host=h", sync=sync, bitmap="b",
                            bitmap_mode="on-success", device_name=dev, device_file=None,
                            bitmap_generation=self.gen[dev], bitmap_next=minted)
        self.prior[dev], self.gen[dev] = self.gen[dev], minted
        t = RepoTarget(target, CLUSTERS * CS, CS, store=self.repo)
        covered = set(self.dirty[dev]) if incremental else set(range(CLUSTERS))
        snap = list(self.image[dev])
        self.dirty[dev] = set()  # consumed at the instant
        order = sorted(covered)
        random.Random(seed).shuffle(order)
        for c in order:
            if snap[c]:
                t.write(c * CS, render([snap[c]]))
            else:
                t.write_zeroes(c * CS, CS)
        self.open[dev] = (t, snap, covered)

    @precondition(lambda self: bool(self.open))
    @rule(data=st.data(), ok=st.booleans())
    def end(self, data: st.DataObject, ok: bool) -> None:
        dev = data.draw(st.sampled_from(sorted(self.open)))
        t, snap, covered = self.open.pop(dev)
        prior = self.prior.pop(dev)
        if ok:
            t.seal()
            self.expected[t.backup_id] = snap
            self.has_full[dev] = True
        else:
            t.abort()
            self.dirty[dev] |= covered  # on-success: the bits go back
            self.gen[dev] = prior  # and the generation with them
        t.close()

    @rule(keep=st.integers(1, 3))
    def prune(self, keep: int) -> None:
        for _, bid in self.repo.prune(Policy(keep_last=keep)):
            del self.expected[bid]

    @rule()
    def gc_mark(self) -> None:
        self.repo.gc_mark()
        self._marked = True

    @rule()
    def gc_sweep(self) -> None:
        result = self.repo.gc_sweep()
        # Postponed exactly while a backup holds its lease (nothing else runs here).
        assert bool(result.postponed) == (bool(self.open) and self._marked), result
        self._marked = False if not result.postponed else self._marked

    @invariant()
    def no_manifest_names_a_missing_chunk(self) -> None:
        assert self.repo.verify(self.repo.manifests())[2] == []

    def teardown(self) -> None:
        try:
            listed = {bid for _, bid, _ in self.repo.manifest_keys()}
            assert listed == set(self.expected)
            for m in self.repo.manifests():
                got = ManifestReader(self.repo, m).read(0, m.size)
                assert got == render(self.expected[m.id]), m.id
        finally:
            for t, _, _ in self.open.values():
                t.abort()
                t.close()


RepoModel.TestCase.settings = settings(max_examples=80, stateful_step_count=30,
                                       deadline=None)
TestRepoModel = RepoModel.TestCase
