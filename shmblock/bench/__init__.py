"""``shmblock-run bench``: scenario benchmarks beside QEMU and the machine's own limits.

:mod:`~shmblock.bench.options` (the plan; no heavy imports, so the CLI can wire the
subcommand cheaply), :mod:`~shmblock.bench.runner` (runs the sections, writes results),
:mod:`~shmblock.bench.scenarios` (the writer × workload × backup matrix),
:mod:`~shmblock.bench.peers` (qemu-img convert, QEMU's backup job),
:mod:`~shmblock.bench.machine` (machine description and limits),
:mod:`~shmblock.bench.scaling` (device size: backup time, memory, freeze),
:mod:`~shmblock.bench.report` (ratios, goals, JSON, Markdown, plots).
Micro-benchmarks live in the repository's ``bench/`` directory (pytest-benchmark).
"""
