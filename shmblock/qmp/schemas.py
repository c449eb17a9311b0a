"""The argument schema of every QMP command shmblock serves (QEMU's names and types).

Taken from QEMU's QAPI schema (``qapi/block-core.json``, ``job.json``,
``transaction.json``, ``block-export.json``, ``sockets.json``), reduced to what
shmblock implements: an argument QEMU knows but shmblock does not is "unexpected" here
rather than silently ignored, except the few that are accepted and ignored on purpose
(``x-perf``, ``compress`` false, ``filter-node-name``; see :mod:`shmblock.qmp.commands`).
"""

from __future__ import annotations

from typing import Any

from shmblock.qmp.schema import Alternate, Enum, FlatUnion

SYNC = Enum(("full", "top", "none", "incremental", "bitmap"))
BITMAP_MODE = Enum(("on-success", "never", "always"))
ON_ERROR = Enum(("report", "ignore", "enospc", "stop", "auto"))
ON_CBW_ERROR = Enum(("break-guest-write", "break-snapshot"))

NODE_DRIVERS = ("shmblock", "file", "raw", "qcow2", "nbd", "copy-before-write",
                "snapshot-access")

NBD_SERVER_ADDRESS = FlatUnion(
    {"type": Enum(("unix", "inet"))}, "type",
    {"unix": {"path": "str", "*abstract": "bool", "*tight": "bool"},
     "inet": {"host": "str", "port": "str", "*numeric": "bool", "*to": "int",
              "*ipv4": "bool", "*ipv6": "bool", "*keep-alive": "bool"}})

BLOCKDEV_ADD = FlatUnion(
    {"driver": Enum(NODE_DRIVERS), "node-name": "str", "*read-only": "bool",
     "*auto-read-only": "bool", "*force-share": "bool", "*discard": Enum(("ignore", "unmap")),
     "*detect-zeroes": Enum(("off", "on", "unmap")),
     "*cache": {"*direct": "bool", "*no-flush": "bool"}},
    "driver",
    {"shmblock": {"*size": "int", "*cluster-size": "int", "*filename": "str",
                  "*max-writers": "int"},
     "file": {"filename": "str", "*aio": Enum(("threads", "native", "io_uring")),
              "*locking": Enum(("auto", "on", "off"))},
     "raw": {"file": "str"},
     "qcow2": {"file": "str", "*backing": Alternate(("str", "null"))},
     "nbd": {"server": NBD_SERVER_ADDRESS, "*export": "str", "*reconnect-delay": "int",
             "*open-timeout": "int"},
     "copy-before-write": {"file": "str", "target": "str", "*on-cbw-error": ON_CBW_ERROR,
                           "*cbw-timeout": "int",
                           "*bitmap": {"node": "str", "name": "str"}},
     "snapshot-access": {"file": "str"}})

BACKUP: dict[str, Any] = {
    "*job-id": "str", "device": "str", "target": "str", "sync": SYNC, "*speed": "int",
    "*bitmap": "str", "*bitmap-mode": BITMAP_MODE, "*compress": "bool",
    "*on-source-error": ON_ERROR, "*on-target-error": ON_ERROR,
    "*auto-finalize": "bool", "*auto-dismiss": "bool", "*filter-node-name": "str",
    "*x-perf": {"*use-copy-range": "bool", "*max-workers": "int", "*max-chunk": "int"},
    "*discard-source": "bool"}

BITMAP = {"node": "str", "name": "str"}
BITMAP_ADD = {"node": "str", "name": "str", "*granularity": "int", "*persistent": "bool",
              "*disabled": "bool"}
BITMAP_MERGE = {"node": "str", "target": "str",
                "bitmaps": [Alternate(("str", {"node": "str", "name": "str"}))]}

TRANSACTION_ACTIONS: dict[str, dict[str, Any]] = {
    "blockdev-backup": BACKUP,
    "block-dirty-bitmap-add": BITMAP_ADD,
    "block-dirty-bitmap-remove": BITMAP,
    "block-dirty-bitmap-clear": BITMAP,
    "block-dirty-bitmap-enable": BITMAP,
    "block-dirty-bitmap-disable": BITMAP,
    "block-dirty-bitmap-merge": BITMAP_MERGE,
}

TRANSACTION = {
    "actions": [FlatUnion({"type": Enum(tuple(TRANSACTION_ACTIONS))}, "type",
                       {k: {"data": v} for k, v in TRANSACTION_ACTIONS.items()})],
    "*properties": {"*completion-mode": Enum(("individual", "grouped"))},
}

JOB_ID = {"id": "str"}
BLOCK_JOB = {"device": "str"}

SCHEMAS: dict[str, Any] = {
    "qmp_capabilities": {"*enable": [Enum(("oob",))]},
    "query-version": {},
    "query-commands": {},
    "quit": {},
    "blockdev-add": BLOCKDEV_ADD,
    "blockdev-del": {"node-name": "str"},
    "blockdev-backup": BACKUP,
    "transaction": TRANSACTION,
    "block-dirty-bitmap-add": BITMAP_ADD,
    "block-dirty-bitmap-remove": BITMAP,
    "block-dirty-bitmap-clear": BITMAP,
    "block-dirty-bitmap-enable": BITMAP,
    "block-dirty-bitmap-disable": BITMAP,
    "block-dirty-bitmap-merge": BITMAP_MERGE,
    "query-jobs": {},
    "query-block-jobs": {},
    "job-pause": JOB_ID,
    "job-resume": JOB_ID,
    "job-cancel": JOB_ID,
    "job-complete": JOB_ID,
    "job-finalize": JOB_ID,
    "job-dismiss": JOB_ID,
    "block-job-pause": BLOCK_JOB,
    "block-job-resume": BLOCK_JOB,
    "block-job-cancel": {"device": "str", "*force": "bool"},
    "block-job-complete": BLOCK_JOB,
    "block-job-finalize": {"id": "str"},
    "block-job-dismiss": {"id": "str"},
    "block-job-set-speed": {"device": "str", "speed": "int"},
    "query-named-block-nodes": {"*flat": "bool"},
    "query-block": {},
    "nbd-server-start": {
        "addr": FlatUnion({"type": Enum(("unix", "inet"))}, "type",
                       {"unix": {"data": {"path": "str", "*abstract": "bool",
                                          "*tight": "bool"}},
                        "inet": {"data": {"host": "str", "port": "str",
                                          "*numeric": "bool", "*to": "int",
                                          "*ipv4": "bool", "*ipv6": "bool",
                                          "*keep-alive": "bool"}}}),
        "*tls-creds": "str", "*tls-authz": "str", "*max-connections": "int"},
    "nbd-server-stop": {},
    "block-export-add": FlatUnion(
        {"type": Enum(("nbd",)), "id": "str", "node-name": "str", "*writable": "bool",
         "*writethrough": "bool", "*fixed-iothread": "bool", "*iothread": "str"},
        "type",
        {"nbd": {"*name": "str", "*description": "str", "*bitmaps": [
            Alternate(("str", {"node": "str", "name": "str"}))],
            "*allocation-depth": "bool"}}),
    "block-export-del": {"id": "str", "*mode": Enum(("safe", "hard"))},
    "query-block-exports": {},
}
