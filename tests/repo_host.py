"""One "host" of the many-hosts repository tests: ``python -m tests.repo_host REPO HOST
ROUNDS DIR``. Three file-backed devices with a persistent dirty bitmap each, an engine
per device and round, writers running during every backup; round 1 full, then
incremental; each backup's reference image (the
snapshot) is kept in DIR, and ``DIR/HOST.json`` maps backup id → reference image.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from shmblock.engine import Engine
from shmblock.job import Outcome

SIZE = 8 << 20
CLUSTER = 64 << 10
DEVICES = 3


def main(repo: str, host: str, rounds: int, out: Path) -> int:
    refs: dict[str, str] = {}
    seed = sum(map(ord, host))
    disks = [out / f"{host}-d{i}.img" for i in range(DEVICES)]
    for disk in disks:
        with open(disk, "wb") as f:
            f.truncate(SIZE)
    for r in range(rounds):
        for i, disk in enumerate(disks):
            # One engine per device and round, as a host's nightly job would run; the
            # bitmap persists in the device file's store between runs (and it keeps
            # the run's queue memory small: mq_overview(7) charges it per user).
            with Engine() as engine:
                dev = engine.create_device(SIZE, CLUSTER, name=f"d{i}", backing_file=str(disk))
                job_sync = "full" if r == 0 else "incremental"
                if r == 0:
                    dev.fill(0.3, seed=i + 1)  # two devices share content across hosts
                    if i == 2:
                        dev.fill(0.2, seed=seed + 7)
                    dev.add_bitmap("b0")
                writers = engine.start_writers(dev, 1, duration=0.5, rate=30,
                                               seed=r * 10 + i + seed)
                ref = out / f"{host}-d{i}-r{r}.raw"
                job = engine.backup(dev, f"{repo}?host={host}&device={host}-d{i}"
                                    "&chunk-size=256K", sync=job_sync, bitmap="b0",
                                    reference_image=str(ref),
                                    bitmap_mode="on-success" if r == 0 else None)
                result = job.wait(120.0)
                engine.wait_writers(60.0)
                del writers
                if result.outcome is not Outcome.COMPLETED:
                    print(f"{host} d{i} round {r}: {result.error}", file=sys.stderr)
                    return 1
                backup_id = result.target.split("?", 1)[0].rsplit("/", 1)[1]
                refs[backup_id] = str(ref)
    (out / f"{host}.json").write_text(json.dumps(refs))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), Path(sys.argv[4])))
