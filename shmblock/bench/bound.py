"""The CPU-share bound on guest retention: what no copy-before-write design can beat.

A retention figure is guest ops/s during a backup over guest ops/s without one, the
same writer processes. On C cores, with N CPU-bound writers, Linux's fair scheduler
(CFS/EEVDF) gives each runnable process an equal share of the CPUs, at most one core:

* without a backup, N runnable writers: each gets ``min(1, C / N)`` of a core;
* during a backup the worker is runnable too. If it would take ``u`` cores on its own
  (``u = 1`` when it copies flat out, less under ``--speed``), it gets
  ``w = min(u, C / (N + 1))`` — never more than a fair share, never more than it wants —
  and the writers share the rest: each gets ``min(1, (C − w) / N)``.

The retention bound is the ratio::

    bound(N, C, u) = min(1, (C − min(u, C/(N+1))) / N) / min(1, C / N)

With the worker busy (``u = 1``): ``N < C`` (a writer alone on a core, and a core left
for the worker) gives 1 — nothing forces a loss; ``N ≥ C`` gives ``N / (N + 1)``
(4 writers on 2 cores: 0.8). This is a ceiling from scheduling alone: it assumes a
write costs the same with or without a backup, so every copy-before-write, every
page-cache write of the worker in the writers' time, and the supervisor's own work push
the measured figure below it. The report shows the measured retention as a fraction of
the bound (issue 9's goal: ≥ 90 % of it).
"""

from __future__ import annotations

import os

FORMULA = "min(1, (C − min(u, C/(N+1))) / N) ÷ min(1, C/N)"


def cpu_share_bound(writers: int, cores: int | None = None, worker_cores: float = 1.0) -> float:
    """Guest retention bound for ``writers`` CPU-bound writers on ``cores`` CPUs while a
    backup worker wanting ``worker_cores`` of a core runs (see the module docstring)."""
    c = float(cores or os.cpu_count() or 1)
    n = max(writers, 1)
    worker = min(max(worker_cores, 0.0), c / (n + 1))
    alone = min(1.0, c / n)
    shared = min(1.0, (c - worker) / n)
    return shared / alone
