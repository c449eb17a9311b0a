"""The QMP commands on an :class:`~shmblock.engine.Engine`: QEMU's block layer, mapped.

Theory of operation. :class:`Monitor` is one more client of the engine's Python API: it
keeps QEMU's *node graph* as a table of :class:`Node` records (what ``blockdev-add``
made) and turns each command into engine calls:

* a ``shmblock`` node is an engine device (shared memory, or a device file);
* ``file`` → ``raw``/``qcow2`` nodes name a backup target file; an ``nbd`` node an NBD
  target URI. ``blockdev-backup`` builds the job's :class:`~shmblock.options.
  BackupOptions` from the target node (the engine writes ``FILE.part`` and renames it
  over the file the user made with ``qemu-img create`` when the job completes);
* fleecing, QEMU's two ways. (1) a ``qcow2`` node whose ``backing`` is a device node is
  a *temporary node*: ``blockdev-backup sync=none`` into it runs a copy-before-write job
  whose scratch is the temp file's ``.part`` (written raw: it is never published, the
  job ends by ``job-cancel`` as in QEMU), and ``block-export-add`` of the temp node
  exports that job's point-in-time view. (2) a ``copy-before-write`` node starts an
  internal ``sync=none`` job (device → its ``target`` node) at once; a
  ``snapshot-access`` node on top is exported as that job's view; ``blockdev-del`` of
  the filter cancels the job. Internal jobs are not listed and emit no events (QEMU's
  filter has no job).

Every command's arguments are checked against :mod:`shmblock.qmp.schemas` before the
handler runs, and every handler checks what it needs (nodes exist, are of the right
kind, are not in use) before its first side effect: an error reply means nothing
changed. Errors: :class:`~shmblock.qmp.wire.QmpError`; an engine error
(:class:`~shmblock.errors.ShmblockError`) becomes a ``GenericError`` with its message.
Commands run one at a time (:attr:`Monitor.lock`), as in QEMU's main loop.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import re
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from shmblock import __version__
from shmblock import transaction as txn
from shmblock.backup_job import BackupJob
from shmblock.device import DEFAULT_CLUSTER_SIZE
from shmblock.device_handle import DeviceHandle
from shmblock.errors import ShmblockError, StateError, UsageError
from shmblock.job import JobEvent, JobState, Outcome
from shmblock.options import BackupOptions
from shmblock.qmp import schema
from shmblock.qmp.schemas import SCHEMAS
from shmblock.qmp.wire import DEVICE_NOT_ACTIVE, QmpError
from shmblock.targets import TargetSpec

if TYPE_CHECKING:
    from shmblock.engine import Engine

#: The QEMU version the greeting and ``query-version`` claim: the QMP dialect spoken
#: (``snapshot-access`` and ``cbw-timeout`` need ≥ 7.1; clients look at this).
QEMU_VERSION = (10, 0, 0)
PACKAGE = f"shmblock {__version__}"

#: QEMU's node names: a letter first, then letters, digits, ``-_.``; at most 31.
NODE_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,30}$")
#: The job ids of copy-before-write nodes' internal jobs: no QMP job id starts so.
INTERNAL_PREFIX = "_cbw"
#: How long a command waits for a job it cancels on its own (blockdev-del, quit).
CANCEL_WAIT = 30.0

_SIMPLE_BITMAP_ACTIONS: dict[str, Callable[[DeviceHandle, str], txn.Action]] = {
    "block-dirty-bitmap-remove": txn.BitmapRemove,
    "block-dirty-bitmap-clear": txn.BitmapClear,
    "block-dirty-bitmap-enable": txn.BitmapEnable,
    "block-dirty-bitmap-disable": txn.BitmapDisable,
}

#: Seconds block-export-del (safe) waits for clients that are leaving.
EXPORT_IN_USE_WAIT = 2.0

Emit = Callable[[str, dict[str, Any], float], None]


@dataclass
class Node:
    """One node of the graph (what ``blockdev-add`` made)."""

    name: str
    driver: str
    options: dict[str, Any]
    device: DeviceHandle | None = None  # shmblock
    filename: str | None = None  # file
    child: str | None = None  # raw/qcow2: file node; cbw/snapshot-access: the filter's file
    backing: str | None = None  # qcow2 temp node: the device node
    target: str | None = None  # cbw: the temp node
    nbd_uri: str | None = None  # nbd
    job: BackupJob | None = None  # cbw: its internal sync=none job
    read_only: bool = False
    parents: set[str] = field(default_factory=set)


@dataclass
class Export:
    id: str
    node: str
    name: str
    writable: bool
    shutting_down: bool = False


class Monitor:
    """QEMU's monitor for one engine: the node graph, jobs, exports; thread-safe."""

    def __init__(self, engine: Engine, emit: Emit,
                 nbd_factory: Callable[[], Any] | None = None,
                 on_quit: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self._emit = emit
        self.lock = threading.RLock()
        self.nodes: dict[str, Node] = {}
        self.exports: dict[str, Export] = {}
        self.internal_jobs: set[str] = set()
        self._deleted_devices: set[str] = set()
        self._internal_ids = itertools.count(1)
        self._nbd_factory = nbd_factory
        self.nbd: Any = None
        self._on_quit = on_quit
        self.handlers: dict[str, Callable[[dict[str, Any]], Any]] = {
            name: getattr(self, "cmd_" + name.replace("-", "_"))
            for name in SCHEMAS if name != "qmp_capabilities"}

    # -- dispatch ---------------------------------------------------------------------------

    def execute(self, command: str, args: dict[str, Any]) -> Any:
        """Run one command (after ``qmp_capabilities``); QmpError for any failure."""
        handler = self.handlers.get(command)
        if handler is None:
            raise QmpError(f"The command {command} has not been found", "CommandNotFound")
        schema.check(SCHEMAS[command], args)
        with self.lock:
            try:
                return handler(args)
            except QmpError:
                raise
            except ShmblockError as exc:
                raise QmpError(str(exc)) from exc
            except OSError as exc:
                raise QmpError(f"{exc.strerror or exc}") from exc

    def job_hook(self, job_id: str) -> Callable[[JobEvent], None]:
        """The ``on_event`` of a job started over QMP."""
        return functools.partial(self.on_job_event, job_id)

    def on_job_event(self, job_id: str, event: JobEvent) -> None:
        """The engine's event hook: QEMU's job events. Called with the job's lock held
        (by the pump or a command): only reads the job and hands the event on."""
        if job_id in self.internal_jobs or job_id.startswith(INTERNAL_PREFIX):
            return
        when = time.time()
        d = event.data
        kind = event.kind
        if kind == "status":
            self._emit("JOB_STATUS_CHANGE", {"id": job_id, "status": d["status"]}, when)
            return
        job = self.engine.jobs.get(job_id)
        if kind in ("completed", "failed", "cancelled"):
            info = self._progress(job, job_id)
            if kind == "cancelled":
                self._emit("BLOCK_JOB_CANCELLED", info, when)
            else:
                if kind == "failed":
                    info["error"] = d.get("error") or "the backup failed"
                self._emit("BLOCK_JOB_COMPLETED", info, when)
        elif kind == "pending":
            self._emit("BLOCK_JOB_PENDING", {"type": "backup", "id": job_id}, when)
        elif kind == "ready":
            self._emit("BLOCK_JOB_READY", self._progress(job, job_id), when)
        elif kind == "error":
            self._emit("BLOCK_JOB_ERROR", {"device": job_id, "operation": d["operation"],
                                           "action": d["action"]}, when)

    @staticmethod
    def _progress(job: BackupJob | None, job_id: str) -> dict[str, Any]:
        done, total = (job.tracker.done, job.tracker.total) if job is not None else (0, 0)
        if job is not None and job.tracker.outcome is Outcome.COMPLETED:
            done = total
        return {"type": "backup", "device": job_id, "len": total, "offset": done,
                "speed": job.speed if job is not None else 0}

    # -- lookups ------------------------------------------------------------------------------

    def _node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Cannot find device='{name}' nor node-name='{name}'")
        return node

    def _device_node(self, name: str) -> Node:
        node = self.nodes.get(name)
        if node is None:
            # QEMU's bdrv_lookup_bs: a GenericError (DeviceNotFound is for the
            # commands that look up a guest device's backend, which shmblock has not).
            raise QmpError(f"Cannot find device='{name}' nor node-name='{name}'")
        if node.device is None:
            raise QmpError(f"Node '{name}' is a {node.driver} node, not a shmblock device")
        return node

    def _bitmap_device(self, name: str) -> DeviceHandle:
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Node '{name}' not found")
        if node.device is None:
            raise QmpError(f"Node '{name}' ({node.driver}) has no dirty bitmaps")
        return node.device

    @staticmethod
    def _bitmap(dev: DeviceHandle, name: str) -> None:
        if name not in dev.bitmaps():
            raise QmpError(f"Dirty bitmap '{name}' not found")

    def _job(self, job_id: str, block: bool = False) -> BackupJob:
        job = self.engine.jobs.get(job_id)
        if job is None or job_id in self.internal_jobs or job.state is JobState.NULL:
            if block:
                raise QmpError(f"No active block job on device '{job_id}'", DEVICE_NOT_ACTIVE)
            raise QmpError("Job not found")
        return job

    def visible_jobs(self) -> list[BackupJob]:
        return [j for j in self.engine.jobs.values()
                if j.job not in self.internal_jobs and j.state is not JobState.NULL]

    # -- general ------------------------------------------------------------------------------

    def cmd_query_version(self, args: dict[str, Any]) -> Any:
        major, minor, micro = QEMU_VERSION
        return {"qemu": {"major": major, "minor": minor, "micro": micro}, "package": PACKAGE}

    def cmd_query_commands(self, args: dict[str, Any]) -> Any:
        return [{"name": name} for name in SCHEMAS]

    def cmd_quit(self, args: dict[str, Any]) -> Any:
        if self._on_quit is not None:
            self._on_quit()
        return {}

    # -- nodes --------------------------------------------------------------------------------

    def cmd_blockdev_add(self, a: dict[str, Any]) -> Any:
        name, driver = a["node-name"], a["driver"]
        if not NODE_NAME_RE.match(name):
            raise QmpError(f"Invalid node-name: '{name}'")
        if name in self.nodes:
            raise QmpError(f"Duplicate nodes with node-name='{name}'")
        node = Node(name, driver, dict(a), read_only=bool(a.get("read-only", False)))
        getattr(self, "_add_" + driver.replace("-", "_"))(node, a)
        self.nodes[name] = node
        for child in (node.child, node.backing, node.target):
            if child is not None:
                self.nodes[child].parents.add(name)
        return {}

    def _add_shmblock(self, node: Node, a: dict[str, Any]) -> None:
        if node.name in self._deleted_devices:
            raise QmpError(f"node-name '{node.name}' named a device deleted in this run; "
                           "choose another name")
        filename = a.get("filename")
        size = a.get("size")
        if filename is not None and size is None:
            try:
                size = os.stat(filename).st_size
            except OSError as exc:
                raise QmpError(f"Could not open '{filename}': {exc.strerror}") from exc
        if size is None:
            raise QmpError("Parameter 'size' is missing (a shmblock node needs a size "
                           "or an existing filename)")
        cluster = a.get("cluster-size", DEFAULT_CLUSTER_SIZE)
        kwargs: dict[str, Any] = {}
        if "max-writers" in a:
            kwargs["max_writers"] = a["max-writers"]
        node.device = self.engine.create_device(size, cluster, name=node.name,
                                                backing_file=filename, **kwargs)

    def _add_file(self, node: Node, a: dict[str, Any]) -> None:
        filename = a["filename"]
        try:
            st = os.stat(filename)
        except OSError as exc:
            raise QmpError(f"Could not open '{filename}': {exc.strerror}") from exc
        if not os.path.isfile(filename) or not st:
            raise QmpError(f"'{filename}' is not a regular file")
        node.filename = filename

    def _file_child(self, name: str) -> Node:
        child = self._node(name)
        if child.driver != "file":
            raise QmpError(f"Node '{name}' is a {child.driver} node; a format node's "
                           "'file' must be a file node")
        if child.parents:
            raise QmpError(f"Node '{name}' is already used by node "
                           f"'{sorted(child.parents)[0]}'")
        return child

    def _add_raw(self, node: Node, a: dict[str, Any]) -> None:
        node.child = self._file_child(a["file"]).name

    def _add_qcow2(self, node: Node, a: dict[str, Any]) -> None:
        child = self._file_child(a["file"])
        path = child.filename or ""
        try:
            with open(path, "rb") as f:
                magic = f.read(4)
        except OSError as exc:
            raise QmpError(f"Could not open '{path}': {exc.strerror}") from exc
        if magic != b"QFI\xfb":
            raise QmpError(f"Image is not in qcow2 format ('{path}')")
        backing = a.get("backing")
        if backing is not None:
            self._device_node(backing)
            node.backing = backing
        node.child = child.name

    def _add_nbd(self, node: Node, a: dict[str, Any]) -> None:
        server, export = a["server"], a.get("export", "")
        if server["type"] == "unix":
            uri = f"nbd+unix:///{export}?socket={server['path']}"
        else:
            host = server["host"]
            host = f"[{host}]" if ":" in host else host
            uri = f"nbd://{host}:{server['port']}/{export}"
        TargetSpec.parse(uri, "nbd")  # the URI's own checks (UsageError)
        node.nbd_uri = uri

    def _add_copy_before_write(self, node: Node, a: dict[str, Any]) -> None:
        if "bitmap" in a:
            raise QmpError("copy-before-write 'bitmap' is not supported by shmblock (every "
                           "cluster is copied before it is overwritten)")
        dev = self._device_node(a["file"])
        target = self._node(a["target"])
        spec = self._target_spec(target, fleecing=True)
        job_id = f"{INTERNAL_PREFIX}{next(self._internal_ids)}"
        self.internal_jobs.add(job_id)
        opts = BackupOptions(spec, sync="none", job_id=job_id,
                             on_cbw_error=a.get("on-cbw-error", "break-guest-write"),
                             cbw_timeout=float(a.get("cbw-timeout", 5)) or 5.0,
                             auto_finalize=True, auto_dismiss=True)
        assert dev.device is not None
        node.job = self.engine.backup(dev.device, opts)
        node.child, node.target = dev.name, target.name

    def _add_snapshot_access(self, node: Node, a: dict[str, Any]) -> None:
        cbw = self._node(a["file"])
        if cbw.driver != "copy-before-write":
            raise QmpError(f"snapshot-access needs a copy-before-write node as 'file'; "
                           f"'{cbw.name}' is {cbw.driver}")
        node.child = cbw.name
        node.read_only = True

    def _target_spec(self, target: Node, fleecing: bool = False) -> TargetSpec:
        """The engine's target for a target node (raw, qcow2, nbd)."""
        if target.driver == "nbd":
            assert target.nbd_uri is not None
            return TargetSpec.parse(target.nbd_uri, "nbd")
        if target.driver == "file" and target.filename is not None:
            return TargetSpec.parse(target.filename, "raw")  # a protocol node: raw bytes
        if target.driver not in ("raw", "qcow2") or target.child is None:
            raise QmpError(f"Node '{target.name}' ({target.driver}) cannot be a backup "
                           "target (raw, qcow2 or nbd)")
        path = self.nodes[target.child].filename
        assert path is not None
        if fleecing or target.backing is not None:
            # A temporary (fleecing) node: scratch space for copy-before-write, read
            # back while the job runs; never published, so written raw.
            return TargetSpec.parse(path, "raw")
        backing = _qcow2_backing(path) if target.driver == "qcow2" else None
        return TargetSpec.parse(path, target.driver, backing[0] if backing else None,
                                backing[1] if backing else None)

    def cmd_blockdev_del(self, a: dict[str, Any]) -> Any:
        name = a["node-name"]
        node = self.nodes.get(name)
        if node is None:
            raise QmpError(f"Failed to find node with node-name='{name}'")
        if node.parents:
            raise QmpError(f"Node '{name}' is busy: node is used as child of "
                           f"'{sorted(node.parents)[0]}'")
        for exp in self.exports.values():
            if exp.node == name:
                raise QmpError(f"Node '{name}' is busy: block device is in use by "
                               f"block export '{exp.id}'")
        for job in self.engine.jobs.values():
            if job.tracker.concluded or job.job in self.internal_jobs:
                continue
            if job.device is node.device or job.spec.target in self._node_paths(node):
                raise QmpError(f"Node '{name}' is busy: block device is in use by block "
                               f"job: backup ('{job.job}')")
        if node.job is not None:  # copy-before-write: its job ends with it
            job = node.job
            if not job.tracker.concluded:
                with contextlib.suppress(StateError):
                    job.cancel()
            job.wait(CANCEL_WAIT)
        if node.device is not None:
            self._remove_device(node.device)
        del self.nodes[name]
        for other in self.nodes.values():
            other.parents.discard(name)
        return {}

    def _node_paths(self, node: Node) -> set[str]:
        if node.nbd_uri:
            return {node.nbd_uri}
        if node.child and self.nodes[node.child].filename:
            return {self.nodes[node.child].filename or ""}
        return {node.filename} if node.filename else set()

    def _remove_device(self, dev: DeviceHandle) -> None:
        """Forget a device no job or writer uses (its backup worker ends too)."""
        try:
            self.engine.remove_device(dev)
        except UsageError as exc:
            raise QmpError(f"Node '{dev.name}' is busy: {exc}") from exc
        self._deleted_devices.add(dev.name)

    # -- backups ------------------------------------------------------------------------------

    def _backup_options(self, a: dict[str, Any]) -> tuple[DeviceHandle, BackupOptions]:
        dev = self._device_node(a["device"])
        target = self._node(a["target"])
        if target.name == dev.name:
            raise QmpError("Source and target cannot be the same")
        if a.get("compress"):
            raise QmpError("Compression is not supported by shmblock's backup targets")
        sync = a["sync"]
        spec = self._target_spec(target)
        if target.backing is not None and sync != "none":
            raise QmpError(f"Node '{target.name}' is a temporary node backed by "
                           f"'{target.backing}': only sync=none can use it")
        if target.backing is not None and target.backing != dev.name:
            raise QmpError(f"Temporary node '{target.name}' is backed by "
                           f"'{target.backing}', not by '{dev.name}'")
        if "job-id" not in a:
            raise QmpError("Parameter 'job-id' is missing (shmblock needs every job named)")
        job_id = a["job-id"]
        if not NODE_NAME_RE.match(job_id):
            # QEMU's id_wellformed (a letter first), which also keeps user jobs apart
            # from the internal ones of copy-before-write nodes ("_cbw1"...).
            raise QmpError(f"Invalid job ID '{job_id}'")
        if job_id in self.engine.jobs and self.engine.jobs[job_id].state is not JobState.NULL:
            raise QmpError(f"Job ID '{job_id}' already in use")
        old = self.engine.jobs.get(job_id)
        if old is not None:
            # QEMU lets a dismissed job's id be used again; the engine keeps every
            # handle. A dismissed job's worker has ended: reap it, forget the handle.
            old.wait(CANCEL_WAIT)
            self.engine.jobs.pop(job_id, None)
        bitmap = a.get("bitmap")
        if bitmap is not None:
            assert dev.device is not None
            self._bitmap(dev.device, bitmap)
        assert dev.device is not None
        opts = BackupOptions(
            spec, sync=sync, speed=a.get("speed", 0), job_id=job_id, bitmap=bitmap,
            bitmap_mode=a.get("bitmap-mode"),
            auto_finalize=a.get("auto-finalize", True),
            auto_dismiss=a.get("auto-dismiss", True),
            on_source_error=_on_error(a.get("on-source-error", "report")),
            on_target_error=_on_error(a.get("on-target-error", "report")))
        return dev.device, opts

    def cmd_blockdev_backup(self, a: dict[str, Any]) -> Any:
        dev, opts = self._backup_options(a)
        self.engine.backup(dev, opts, on_event=self.job_hook(opts.job_id or ""))
        return {}

    def cmd_transaction(self, a: dict[str, Any]) -> Any:
        mode = a.get("properties", {}).get("completion-mode", "individual")
        actions: list[txn.Action] = []
        after: list[Callable[[], None]] = []
        added: set[tuple[str, str]] = set()  # bitmaps an earlier action adds
        for item in a["actions"]:
            kind, d = item["type"], item["data"]
            if kind == "blockdev-backup":
                dev, opts = self._backup_options(d)
                actions.append(txn.Backup(dev, opts,
                                          on_event=self.job_hook(opts.job_id or "")))
                continue
            dev = self._bitmap_device(d["node"])
            if kind == "block-dirty-bitmap-add":
                if d.get("granularity", dev.cluster_size) != dev.cluster_size:
                    raise QmpError("a bitmap added in a transaction has the cluster size "
                                   f"({dev.cluster_size}) as granularity")
                actions.append(txn.BitmapAdd(dev, d["name"]))
                added.add((dev.name, d["name"]))
                if d.get("disabled"):
                    after.append(functools.partial(dev.disable_bitmap, d["name"]))
            elif kind == "block-dirty-bitmap-merge":
                actions.append(txn.BitmapMerge(dev, d["target"],
                                               tuple(self._merge_sources(d))))
            else:
                if (dev.name, d["name"]) not in added:
                    self._bitmap(dev, d["name"])  # QEMU's error, before the engine's
                actions.append(_SIMPLE_BITMAP_ACTIONS[kind](dev, d["name"]))
        self.engine.transaction(actions, mode)
        for step in after:
            step()
        return {}

    # -- bitmaps ------------------------------------------------------------------------------

    def cmd_block_dirty_bitmap_add(self, a: dict[str, Any]) -> Any:
        node = self.nodes.get(a["node"])
        if node is None:
            raise QmpError(f"Cannot find device='{a['node']}' nor node-name='{a['node']}'")
        dev = self._bitmap_device(a["node"])
        if a["name"] in dev.bitmaps():
            raise QmpError(f"Bitmap already exists: {a['name']}")
        dev.add_bitmap(a["name"], a.get("granularity"), persistent=a.get("persistent", False))
        if a.get("disabled"):
            dev.disable_bitmap(a["name"])
        return {}

    def _named_bitmap(self, a: dict[str, Any]) -> DeviceHandle:
        dev = self._bitmap_device(a["node"])
        self._bitmap(dev, a["name"])
        return dev

    def cmd_block_dirty_bitmap_remove(self, a: dict[str, Any]) -> Any:
        self._named_bitmap(a).remove_bitmap(a["name"])
        return {}

    def cmd_block_dirty_bitmap_clear(self, a: dict[str, Any]) -> Any:
        self._named_bitmap(a).clear_bitmap(a["name"])
        return {}

    def cmd_block_dirty_bitmap_enable(self, a: dict[str, Any]) -> Any:
        self._named_bitmap(a).enable_bitmap(a["name"])
        return {}

    def cmd_block_dirty_bitmap_disable(self, a: dict[str, Any]) -> Any:
        self._named_bitmap(a).disable_bitmap(a["name"])
        return {}

    def _merge_sources(self, a: dict[str, Any]) -> list[str]:
        dev = self._bitmap_device(a["node"])
        self._bitmap(dev, a["target"])
        names = []
        for src in a["bitmaps"]:
            if isinstance(src, dict):
                if src["node"] != a["node"]:
                    raise QmpError("merging bitmaps of another node is not supported")
                name = str(src["name"])
            else:
                name = str(src)
            self._bitmap(dev, name)
            names.append(name)
        return names

    def cmd_block_dirty_bitmap_merge(self, a: dict[str, Any]) -> Any:
        names = self._merge_sources(a)
        self._bitmap_device(a["node"]).merge_bitmaps(a["target"], names)
        return {}

    # -- jobs ---------------------------------------------------------------------------------

    def job_info(self, job: BackupJob) -> dict[str, Any]:
        done, total = job.progress
        info: dict[str, Any] = {"id": job.job, "type": "backup",
                                "status": job.state.value, "current-progress": done,
                                "total-progress": total}
        if job.tracker.outcome is Outcome.FAILED or (
                job.tracker.outcome is Outcome.CANCELLED and job.tracker.error):
            info["error"] = job.tracker.error or "the backup failed"
        return info

    def block_job_info(self, job: BackupJob) -> dict[str, Any]:
        done, total = job.progress
        lc = job.lifecycle
        info: dict[str, Any] = {
            "type": "backup", "device": job.job, "len": total, "offset": done,
            "busy": job.state is JobState.RUNNING, "paused": lc.user_paused,
            "speed": job.speed, "io-status": lc.io_status.value, "ready": False,
            "status": job.state.value, "auto-finalize": lc.auto_finalize,
            "auto-dismiss": lc.auto_dismiss}
        if job.tracker.outcome is Outcome.FAILED:
            info["error"] = job.tracker.error or "the backup failed"
        return info

    def cmd_query_jobs(self, a: dict[str, Any]) -> Any:
        return [self.job_info(j) for j in self.visible_jobs()]

    def cmd_query_block_jobs(self, a: dict[str, Any]) -> Any:
        return [self.block_job_info(j) for j in self.visible_jobs()]

    def cmd_job_pause(self, a: dict[str, Any]) -> Any:
        self._job(a["id"]).pause()
        return {}

    def cmd_job_resume(self, a: dict[str, Any]) -> Any:
        self._job(a["id"]).resume()
        return {}

    def cmd_job_cancel(self, a: dict[str, Any]) -> Any:
        self._job(a["id"]).cancel()
        return {}

    def cmd_job_complete(self, a: dict[str, Any]) -> Any:
        # A backup has no ready phase (QEMU refuses complete in every state).
        self._job(a["id"]).tracker.command("complete")
        return {}

    def cmd_job_finalize(self, a: dict[str, Any]) -> Any:
        self._job(a["id"]).finalize()
        return {}

    def cmd_job_dismiss(self, a: dict[str, Any]) -> Any:
        self._job(a["id"]).dismiss()
        return {}

    def cmd_block_job_pause(self, a: dict[str, Any]) -> Any:
        self._job(a["device"], block=True).pause()
        return {}

    def cmd_block_job_resume(self, a: dict[str, Any]) -> Any:
        self._job(a["device"], block=True).resume()
        return {}

    def cmd_block_job_cancel(self, a: dict[str, Any]) -> Any:
        # force: QEMU's soft cancel only differs for a ready mirror; a backup aborts.
        self._job(a["device"], block=True).cancel()
        return {}

    def cmd_block_job_complete(self, a: dict[str, Any]) -> Any:
        job = self._job(a["device"], block=True)
        job.tracker.command("complete")
        return {}

    def cmd_block_job_finalize(self, a: dict[str, Any]) -> Any:
        self._job(a["id"], block=True).finalize()
        return {}

    def cmd_block_job_dismiss(self, a: dict[str, Any]) -> Any:
        self._job(a["id"], block=True).dismiss()
        return {}

    def cmd_block_job_set_speed(self, a: dict[str, Any]) -> Any:
        if a["speed"] < 0:
            raise QmpError("Parameter 'speed' expects a non-negative value")
        self._job(a["device"], block=True).set_speed(a["speed"])
        return {}

    # -- queries ------------------------------------------------------------------------------

    def node_info(self, node: Node) -> dict[str, Any]:
        filename, fmt, size = "", node.driver, 0
        if node.device is not None:
            filename = node.device.device.backing_file or f"shm:{node.device.name}"
            size = node.device.size
        elif node.filename:
            filename = node.filename
            with contextlib.suppress(OSError):
                size = os.stat(node.filename).st_size
        elif node.child and node.child in self.nodes:
            child = self.nodes[node.child]
            filename = self.node_info(child)["file"]
            size = self.node_info(child)["image"]["virtual-size"]
        elif node.nbd_uri:
            filename = node.nbd_uri
        info: dict[str, Any] = {
            "node-name": node.name, "drv": node.driver, "file": filename,
            "ro": node.read_only, "encrypted": False, "backing_file_depth": 0,
            "detect_zeroes": "off", "bps": 0, "bps_rd": 0, "bps_wr": 0, "iops": 0,
            "iops_rd": 0, "iops_wr": 0, "write_threshold": 0,
            "cache": {"writeback": True, "direct": False, "no-flush": False},
            "image": {"filename": filename, "format": fmt, "virtual-size": size}}
        if node.backing:
            info["backing_file"] = node.backing
            info["backing_file_depth"] = 1
        if node.device is not None:
            info["dirty-bitmaps"] = [
                {"name": b.name, "granularity": b.granularity, "count": b.count,
                 "recording": b.enabled, "busy": b.busy is not None,
                 "persistent": b.persistent,
                 **({"inconsistent": True} if b.consistency != "consistent" else {})}
                for b in node.device.bitmap_info()]
        return info

    def cmd_query_named_block_nodes(self, a: dict[str, Any]) -> Any:
        return [self.node_info(n) for n in self.nodes.values()]

    def cmd_query_block(self, a: dict[str, Any]) -> Any:
        # QEMU lists block backends; a node added with blockdev-add has none. shmblock
        # lists its devices as if each had one (named by its node).
        out = []
        for node in self.nodes.values():
            if node.device is not None:
                info = self.node_info(node)
                out.append({"device": node.name, "qdev": node.name, "locked": False,
                            "removable": False, "tray_open": False,
                            "io-status": "ok", "inserted": info,
                            "dirty-bitmaps": info["dirty-bitmaps"]})
        return out

    # -- NBD server and exports ----------------------------------------------------------------

    def cmd_nbd_server_start(self, a: dict[str, Any]) -> Any:
        if self.nbd is not None:
            raise QmpError("NBD server already running")
        if a.get("tls-creds") or a.get("tls-authz"):
            raise QmpError("TLS is not supported by shmblock's NBD server")
        if self._nbd_factory is None:
            raise QmpError("this shmblock has no NBD server (shmblock.nbd is not "
                           "available)")
        addr = a["addr"]
        factory: Callable[..., Any] = self._nbd_factory
        server = factory(max_connections=a.get("max-connections", 0) or 16)
        try:
            if addr["type"] == "unix":
                server.start_unix(addr["data"]["path"])
            else:
                host, port = addr["data"]["host"], addr["data"]["port"]
                if not port.isdigit():
                    raise QmpError(f"Service '{port}' must be a port number")
                server.start_tcp(host, int(port))
        except BaseException:
            with contextlib.suppress(Exception):
                server.stop()
            raise
        self.nbd = server
        return {}

    def cmd_nbd_server_stop(self, a: dict[str, Any]) -> Any:
        if self.nbd is None:
            raise QmpError("NBD server not running")
        self.stop_nbd()
        return {}

    def stop_nbd(self) -> None:
        """Remove every export (BLOCK_EXPORT_DELETED each), stop the server."""
        for exp in list(self.exports.values()):
            self._delete_export(exp, hard=True)
        if self.nbd is not None:
            server, self.nbd = self.nbd, None
            server.stop()

    def cmd_block_export_add(self, a: dict[str, Any]) -> Any:
        if self.nbd is None:
            raise QmpError("NBD server not running")
        exp_id, node_name = a["id"], a["node-name"]
        if exp_id in self.exports:
            raise QmpError(f"Block export id '{exp_id}' is already in use")
        node = self.nodes.get(node_name)
        if node is None:
            raise QmpError(f"Cannot find device='' nor node-name='{node_name}'")
        name = a.get("name", node_name)
        if any(e.name == name for e in self.exports.values()):
            raise QmpError(f"NBD server already has export named '{name}'")
        if a.get("bitmaps") or a.get("allocation-depth"):
            raise QmpError("exporting dirty bitmaps or allocation depth is not supported")
        writable = a.get("writable", False)
        source = self._export_source(node, writable)
        try:
            self.nbd.add_export(name, source, description=a.get("description", ""))
        except BaseException:
            source.close()
            raise
        self.exports[exp_id] = Export(exp_id, node_name, name, writable)
        return {}

    def _export_source(self, node: Node, writable: bool) -> Any:
        from shmblock import nbd  # the NBD server's package (contract C3)

        if node.device is not None:
            if not writable:
                # QEMU exports read-only unless asked; the live export is writable: a
                # read-only view of a live device has no use here.
                raise QmpError("a shmblock device is exported live: set 'writable': true "
                               "(a point-in-time view is a fleecing export)")
            return nbd.live_export(node.device)
        if writable:
            raise QmpError("Cannot export read-only node as writable")
        job: BackupJob | None = None
        dev: DeviceHandle | None = None
        if node.driver == "snapshot-access":
            cbw = self.nodes[node.child or ""]
            job = cbw.job
            dev = self.nodes[cbw.child or ""].device
        elif node.backing is not None:
            dev = self.nodes[node.backing].device
            paths = self._node_paths(node)
            for j in self.engine.jobs.values():
                if (j.device is dev and j.sync == "none" and not j.tracker.concluded
                        and j.spec.target in paths):
                    job = j
        if job is None or dev is None:
            raise QmpError(f"Node '{node.name}' cannot be exported: export a shmblock "
                           "device, a snapshot-access node, or a temporary node with a "
                           "running sync=none backup into it")
        return nbd.fleecing_export(dev, job)

    def cmd_block_export_del(self, a: dict[str, Any]) -> Any:
        exp = self.exports.get(a["id"])
        if exp is None:
            raise QmpError(f"Export '{a['id']}' is not found")
        if exp.shutting_down:
            raise QmpError(f"Export '{a['id']}' is already shutting down")
        self._delete_export(exp, hard=a.get("mode", "safe") == "hard")
        return {}

    def _delete_export(self, exp: Export, hard: bool) -> None:
        if self.nbd is not None:
            # A client that has just closed its connection may not be noticed yet:
            # give it a moment before calling the export in use (QEMU's safe mode).
            deadline = time.monotonic() + EXPORT_IN_USE_WAIT
            while True:
                in_use = [e for e in self.nbd.exports() if e.name == exp.name
                          and e.connections]
                if hard or not in_use:
                    break
                if time.monotonic() >= deadline:
                    raise QmpError(f"export '{exp.id}' still in use (use mode 'hard' to "
                                   "disconnect its clients)")
                time.sleep(0.05)
            self.nbd.remove_export(exp.name, hard=hard)
        del self.exports[exp.id]
        self._emit("BLOCK_EXPORT_DELETED", {"id": exp.id}, time.time())

    def cmd_query_block_exports(self, a: dict[str, Any]) -> Any:
        return [{"id": e.id, "type": "nbd", "node-name": e.node,
                 "shutting-down": e.shutting_down} for e in self.exports.values()]

    # -- the end ------------------------------------------------------------------------------

    def close(self) -> None:
        """Stop the NBD server; cancel internal jobs (the engine cancels the rest)."""
        with self.lock:
            with contextlib.suppress(Exception):
                self.stop_nbd()
            for node in self.nodes.values():
                if node.job is not None and not node.job.tracker.concluded:
                    with contextlib.suppress(ShmblockError):
                        node.job.cancel()


def _on_error(policy: str) -> str:
    # QEMU's ``auto`` is ``report`` for a backup job that is not a guest device's.
    return "report" if policy == "auto" else policy


def _qcow2_backing(path: str) -> tuple[str, str | None] | None:
    """The backing file named in a qcow2 header (``qemu-img create -b``), kept when the
    engine writes its own image in the file's place; None if it has none."""
    try:
        with open(path, "rb") as f:
            header = f.read(104)
            if len(header) < 72 or header[:4] != b"QFI\xfb":
                return None
            version, offset, size = struct.unpack(">IQI", header[4:20])
            if not offset or not 0 < size <= 1023:
                return None
            fmt = None
            if version >= 3 and len(header) >= 104:
                # Header extensions follow the header (qcow2.txt): the backing format's
                # type is 0xE2792ACA.
                pos = struct.unpack(">I", header[100:104])[0]
                f.seek(pos)
                for _ in range(64):
                    ext = f.read(8)
                    if len(ext) < 8:
                        break
                    kind, length = struct.unpack(">II", ext)
                    if kind == 0 or length > 4096:
                        break
                    data = f.read((length + 7) & ~7)
                    if kind == 0xE2792ACA:
                        fmt = data[:length].decode("ascii", "replace")
            f.seek(offset)
            name = f.read(size).decode("utf-8", "replace")
    except OSError:
        return None
    return name, fmt
