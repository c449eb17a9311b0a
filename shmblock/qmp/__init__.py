"""QMP, QEMU's monitor protocol, for ``shmblock-run serve``.

* :mod:`shmblock.qmp.wire` — the protocol without I/O (greeting, framing, replies, events);
* :mod:`shmblock.qmp.schema`, :mod:`shmblock.qmp.schemas` — argument checking;
* :mod:`shmblock.qmp.commands` — the commands, on an :class:`~shmblock.engine.Engine`.

The sockets, threads and signals are :mod:`shmblock.serve`'s.
"""
