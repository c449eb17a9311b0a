"""Bitmap lineage: which backup a dirty bitmap's bits are "the changes since".

Theory of operation. An incremental backup is right only if its bitmap holds every
cluster written since its *parent's* snapshot instant. The bitmap's name does not say
that: between two backups the bitmap may have been consumed by a backup to another
target, cleared, removed and re-added, or disabled (missing writes), and an incremental
that trusted the name would silently miss changes. So every dirty bitmap carries a
**generation**, a random 128-bit id (32 hex digits), that names the interval its bits
describe, and a new one begins whenever the bits stop meaning "every write since the
generation began":

==========================  ==========================================================
event                       generation afterwards
==========================  ==========================================================
add                         a new one
clear                       a new one (made durable *before* the bits go)
remove (and a later add)    gone; the new bitmap gets a new one
disable                     a new one: from now on writes are missed, so whatever
                            interval the bits described is no longer complete (enable
                            keeps it: a generation that began while disabled is
                            never recorded by a backup, see below)
merge into it               kept: merging only adds bits, so the bitmap still holds
                            every write since its generation began (a superset copies
                            a little more, never misses)
a backup consumes it        at the instant, a new one minted for the job (the bitmap
                            now holds "the writes since this snapshot")
==========================  ==========================================================

The consuming job's end (:func:`settled`) decides which generation stays, with the
bits (:mod:`shmblock.snapshot`'s table of bitmap modes):

* nothing put back (completed, ``on-success``/``always``): the job's generation, which
  its backup records (a repository manifest's ``bitmap_generation``);
* every frozen bit put back (failed or cancelled under ``on-success``/``never``, any
  ``never`` job, a snapshot taken back, ``always`` after a failure when nothing counts
  as copied): the bitmap is as if the job had not run, so the generation it had before;
* some frozen bits put back (``always`` when a failed job's copied clusters are known):
  a new one, which no backup has — the bits describe a partial copy nobody keeps.

Only if the bitmap still has the job's generation at its end: a disable meanwhile
already ended it, and that stands.

A backup records the generation it gave the bitmap only when the bitmap then describes
"since this backup": it was recording at the instant and the mode resets it (not
``never``). A repository incremental (:mod:`shmblock.repo.target`) takes as parent the
device's backup whose recorded generation equals the bitmap's at the snapshot instant,
and refuses when there is none. The engine reads that generation when it prepares the
job (it travels to the worker in the target URL) and the snapshot checks, inside the
freeze, that the bitmap still has it; a change in between fails the job
(:class:`~shmblock.errors.BitmapError`) instead of letting it back up onto the wrong
parent.

Where the generation lives: a file-backed device's persistent store keeps it in each
directory entry (:mod:`shmblock.bitmaps.ondisk`, version 2), and a backup's frozen copy
keeps the generation the bitmap had before, so a run that dies mid-job puts back the
bits *and* that generation at the next open. A device in shared memory keeps them in
its :class:`~shmblock.device_handle.DeviceHandle`, for the run.
"""

from __future__ import annotations

import re
import secrets

import numpy as np
import numpy.typing as npt

GENERATION_RE = re.compile(r"^[0-9a-f]{32}$")


def new_generation() -> str:
    """A fresh generation: 128 random bits as 32 lower-case hex digits."""
    return secrets.token_hex(16)


def settled(prior: str, minted: str, frozen: npt.NDArray[np.bool_] | npt.NDArray[np.uint8],
            put_back: npt.NDArray[np.bool_] | npt.NDArray[np.uint8] | None) -> str:
    """The generation a consumed bitmap keeps at its job's end (see the module docstring).

    ``prior``: the bitmap's generation before the job; ``minted``: the one the job gave
    it; ``frozen``: the bits the job took; ``put_back``: the bits ORed back (None: none).
    """
    if put_back is None:
        return minted
    if not np.any((np.asarray(frozen) != 0) & (np.asarray(put_back) == 0)):
        return prior  # every frozen bit is back: as if the job had not run
    return new_generation()
