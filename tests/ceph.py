"""A real single-node Ceph cluster for the tests: monitor, OSD, RADOS Gateway.

Theory of operation. The S3 repository and the RBD target are tested against the real
thing, not a mock: Debian's ``ceph-mon``, ``ceph-osd`` and ``radosgw`` (and the
``ceph``/``rbd``/``radosgw-admin`` tools of ``ceph-common``) run as children of the test
process, with every piece of state in one temporary directory:

* one monitor on a free loopback port (messenger v2 only), ``auth none`` everywhere —
  which is why the gateway needs ``ms mon client mode = crc`` (with auth none the
  monitor only offers crc mode, and radosgw asks for secure mode by default);
* one OSD on ``memstore``: objects live in the OSD's memory, nothing is written to a
  block file (so there is no bluestore block file to keep out of the data directory),
  and pool size 1 with ``osd crush chooseleaf type = 0`` so one OSD is a healthy
  cluster;
* no manager: nothing the tests do (S3 through radosgw, ``rbd create``, qemu's ``rbd:``
  driver) needs one, and leaving it out saves ~15 s and ~300 MB;
* radosgw with the beast frontend on a free loopback port, ``rgw exit timeout secs`` low
  so a stop is quick, and one S3 user made with ``radosgw-admin user create``.

Every daemon runs in the foreground (``-f``) as a direct child, so we hold its
``Popen`` (the pid cannot be reused under us until we reap it) and it gets
``PR_SET_PDEATHSIG``: if the test process is killed outright, the kernel kills the
daemons too. :meth:`CephCluster.stop` kills them, then checks that no process whose
command line names the cluster directory is left, and removes the directory.

The machine is shared and slow, so every wait is a poll with a generous deadline, every
command a ``timeout=``, and a start that fails (a port taken between choosing it and
binding it, a daemon that died) is retried from scratch on new ports.

Run ``python -m tests.ceph`` to start one by hand (it prints the endpoint and keys and
runs until Ctrl-C) — the benchmarks in ``bench/`` use it the same way.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import botocore.config
import pytest

#: The Debian packages the cluster needs (``make tools`` installs them).
PACKAGES = {"ceph-mon": "ceph-mon", "ceph-osd": "ceph-osd", "radosgw": "radosgw",
            "ceph": "ceph-common", "rbd": "ceph-common", "radosgw-admin": "ceph-common",
            "monmaptool": "ceph-base"}

#: For the whole start, all attempts (a quiet machine needs ~15 s; eight engineers share
#: two cores here). Below pytest-timeout's 300 s, which the first ceph test's set-up counts.
START_TIMEOUT = 240.0
COMMAND_TIMEOUT = 120.0
START_ATTEMPTS = 3

_PR_SET_PDEATHSIG = 1


class CephError(RuntimeError):
    """The test cluster could not be started or driven (the message has the log tail)."""


def missing_tools() -> list[str]:
    """The Debian packages whose programs are not on PATH (empty when all are)."""
    return sorted({pkg for prog, pkg in PACKAGES.items() if shutil.which(prog) is None})


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (the start retries if someone takes it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _die_with_parent() -> None:
    # Runs in the child between fork and exec: ask the kernel to SIGKILL the daemon when
    # the thread that started it exits, so a killed test run leaves no daemons behind.
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def _tail(path: Path, lines: int = 25) -> str:
    try:
        text = path.read_text(errors="replace").splitlines()
    except OSError:
        return f"(no {path.name})"
    return "\n".join(text[-lines:])


@dataclass
class CephCluster:
    """One single-node cluster in ``root``; :meth:`start` it, :meth:`stop` it."""

    root: Path
    mon_port: int = 0
    rgw_port: int = 0
    access_key: str = "shmblocktest"
    secret_key: str = field(default_factory=lambda: uuid.uuid4().hex)
    startup_seconds: float = 0.0
    _procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    # -- addresses --------------------------------------------------------------------

    @property
    def conf(self) -> Path:
        return self.root / "ceph.conf"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.rgw_port}"

    @property
    def mon_host(self) -> str:
        return f"v2:127.0.0.1:{self.mon_port}"

    def env(self) -> dict[str, str]:
        """Environment variables that point an AWS client at the gateway."""
        return {"AWS_ACCESS_KEY_ID": self.access_key,
                "AWS_SECRET_ACCESS_KEY": self.secret_key,
                "AWS_DEFAULT_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": self.endpoint_url}

    # -- life cycle -------------------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start monitor, OSD and gateway and create the S3 user; retried on new ports."""
        if threading.current_thread() is not threading.main_thread():
            # PR_SET_PDEATHSIG fires when the *thread* that forked exits.
            raise CephError("start the cluster from the main thread")
        began = time.monotonic()
        errors: list[str] = []
        for attempt in range(1, START_ATTEMPTS + 1):
            left = began + timeout - time.monotonic()
            if left < 30:
                break
            try:
                self._start_once(left)
            except CephError as exc:
                errors.append(f"attempt {attempt}: {exc}")
                self._kill_all()
                continue
            self.startup_seconds = time.monotonic() - began
            return
        raise CephError("the test Ceph cluster did not start:\n" + "\n\n".join(errors))

    def _start_once(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for sub in ("mon", "osd", "run", "log", "rgw"):
            path = self.root / sub
            shutil.rmtree(path, ignore_errors=True)
            path.mkdir(parents=True)
        self.mon_port, self.rgw_port = free_port(), free_port()
        fsid = str(uuid.uuid4())
        self.conf.write_text(self._conf_text(fsid))
        monmap = self.root / "monmap"
        self._run(["monmaptool", "--create", "--clobber", "--fsid", fsid,
                   "--addv", "a", f"[{self.mon_host}]", str(monmap)])
        self._run(["ceph-mon", "-c", str(self.conf), "-i", "a", "--mkfs",
                   "--monmap", str(monmap)])
        self._spawn("mon.a", ["ceph-mon", "-f", "-c", str(self.conf), "-i", "a"])
        self._wait(lambda: self._probe(["ceph", "mon", "stat"]), deadline, "the monitor",
                   "mon.a")

        osd_uuid = str(uuid.uuid4())
        osd_id = self.ceph("osd", "new", osd_uuid).strip()
        self._run(["ceph-osd", "-c", str(self.conf), "-i", osd_id, "--mkfs",
                   "--osd-uuid", osd_uuid])
        self._spawn("osd.0", ["ceph-osd", "-f", "-c", str(self.conf), "-i", osd_id])
        self._wait(self._osd_up, deadline, "the OSD to come up", "osd.0")

        self.start_rgw(deadline - time.monotonic())
        # --access-key/--secret-key make the keys ours; repeated starts reuse the user.
        self._run(["radosgw-admin", "-c", str(self.conf), "user", "create", "--uid",
                   "shmblock", "--display-name", "shmblock tests", "--access-key",
                   self.access_key, "--secret-key", self.secret_key])

    def _conf_text(self, fsid: str) -> str:
        r = self.root
        return f"""\
[global]
fsid = {fsid}
mon host = [{self.mon_host}]
public addr = 127.0.0.1
ms bind msgr1 = false
auth cluster required = none
auth service required = none
auth client required = none
auth supported = none
# With auth none the monitor offers only crc mode; radosgw asks for secure by default.
ms mon client mode = crc
osd pool default size = 1
osd pool default min size = 1
osd pool default pg num = 8
osd pool default pgp num = 8
mon max pg per osd = 1000
mon allow pool size one = true
mon allow pool delete = true
mon warn on pool no redundancy = false
# A full shared disk must not make the monitor shut itself down mid-test.
mon data avail warn = 1
mon data avail crit = 0
osd crush chooseleaf type = 0
osd objectstore = memstore
memstore device bytes = 2147483648
run dir = {r}/run
admin socket = {r}/run/$name.asok
pid file = {r}/run/$name.pid
log file = {r}/log/$name.log
mon cluster log file = {r}/log/cluster.log
mon data = {r}/mon
osd data = {r}/osd
keyring = /dev/null
[client.rgw]
rgw frontends = beast endpoint=127.0.0.1:{self.rgw_port}
rgw data = {r}/rgw
rgw exit timeout secs = 2
# No metadata cache, so no cache notifications: after radosgw is killed its watches live
# on for the watch timeout (30 s), and every bucket create would wait for the dead one.
rgw cache enabled = false
rgw thread pool size = 64
"""

    def stop(self) -> None:
        """Kill every daemon, check none is left, remove the directory."""
        self._kill_all()
        strays = self.stray_processes()
        for pid in strays:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        if strays:
            raise CephError(f"processes of the test cluster were still running: {strays}")

    def _kill_all(self) -> None:
        # SIGKILL, not SIGTERM: the state is thrown away anyway, and memstore saves
        # every object to the data directory on a clean shutdown (slow, pointless).
        for name in ("client.rgw", "osd.0", "mon.a"):
            self._kill(name)

    def _kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        proc = self._procs.pop(name, None)
        if proc is None:
            return
        if proc.poll() is None:
            proc.send_signal(sig)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=60)

    def stray_processes(self) -> list[int]:
        """Pids of processes whose command line names this cluster's directory."""
        mark = str(self.root).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                if mark in (entry / "cmdline").read_bytes():
                    found.append(int(entry.name))
            except OSError:
                continue
        return found

    # -- fault injection --------------------------------------------------------------

    def kill_rgw(self, sig: int = signal.SIGKILL) -> None:
        """Kill the gateway (SIGKILL by default: a crash, not a shutdown)."""
        self._kill("client.rgw", sig)

    def start_rgw(self, timeout: float = START_TIMEOUT) -> None:
        """Start the gateway and wait until it answers HTTP."""
        if threading.current_thread() is not threading.main_thread():
            raise CephError("start radosgw from the main thread (PR_SET_PDEATHSIG)")
        deadline = time.monotonic() + timeout
        self._spawn("client.rgw", ["radosgw", "-f", "-c", str(self.conf),
                                   "-n", "client.rgw"])
        self._wait(self._rgw_answers, deadline, "radosgw to answer HTTP", "client.rgw")

    def restart_rgw(self) -> None:
        self.kill_rgw()
        self.start_rgw()

    @property
    def rgw_running(self) -> bool:
        proc = self._procs.get("client.rgw")
        return proc is not None and proc.poll() is None

    # -- commands ---------------------------------------------------------------------

    def ceph(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        """Run ``ceph ARGS`` against the cluster; its stdout."""
        return self._run(["ceph", "-c", str(self.conf), "--connect-timeout",
                          str(int(timeout)), *args], timeout)

    def rbd(self, *args: str, timeout: float = COMMAND_TIMEOUT) -> str:
        return self._run(["rbd", "-c", str(self.conf), *args], timeout)

    def ensure_rbd_pool(self, pool: str = "rbd") -> str:
        """Create (once) and initialise an RBD pool; its name."""
        pools = json.loads(self.ceph("osd", "pool", "ls", "-f", "json"))
        if pool not in pools:
            self.ceph("osd", "pool", "create", pool, "8")
            self.rbd("pool", "init", pool)
        return pool

    def _run(self, argv: list[str], timeout: float = COMMAND_TIMEOUT) -> str:
        try:
            done = subprocess.run(argv, capture_output=True, timeout=timeout, check=False,
                                  stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:
            raise CephError(f"{argv[0]} did not finish within {timeout:g} s: "
                            f"{' '.join(argv)}") from exc
        if done.returncode != 0:
            raise CephError(f"{' '.join(argv)} failed ({done.returncode}): "
                            f"{done.stderr.decode(errors='replace').strip()[-2000:]}")
        return done.stdout.decode(errors="replace")

    def _spawn(self, name: str, argv: list[str]) -> None:
        out = open(self.root / "log" / f"{name}.out", "ab")  # noqa: SIM115 - child owns it
        try:
            self._procs[name] = subprocess.Popen(
                argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                preexec_fn=_die_with_parent)  # noqa: PLW1509 - prctl needs it
        finally:
            out.close()

    def _wait(self, ready: object, deadline: float, what: str, daemon: str) -> None:
        assert callable(ready)
        while True:
            proc = self._procs.get(daemon)
            if proc is None or proc.poll() is not None:
                raise CephError(f"{daemon} exited while waiting for {what}:\n"
                                f"{_tail(self.root / 'log' / f'{daemon}.log')}\n"
                                f"{_tail(self.root / 'log' / f'{daemon}.out', 10)}")
            if ready():
                return
            if time.monotonic() > deadline:
                raise CephError(f"timed out waiting for {what}:\n"
                                f"{_tail(self.root / 'log' / f'{daemon}.log')}")
            time.sleep(0.5)

    def _probe(self, argv: list[str]) -> bool:
        try:
            self._run([argv[0], "-c", str(self.conf), "--connect-timeout", "10", *argv[1:]],
                      timeout=30)
        except CephError:
            return False
        return True

    def _osd_up(self) -> bool:
        try:
            stat = json.loads(self.ceph("osd", "stat", "-f", "json", timeout=30))
        except (CephError, ValueError):
            return False
        return int(stat.get("num_up_osds", 0)) >= 1

    def _rgw_answers(self) -> bool:
        try:
            with urllib.request.urlopen(self.endpoint_url, timeout=5) as resp:
                return int(resp.status) == 200
        except urllib.error.HTTPError:
            return True          # any HTTP answer means the frontend is up
        except OSError:
            return False


@contextlib.contextmanager
def running_cluster(parent: str | None = None) -> Iterator[CephCluster]:
    """A started :class:`CephCluster` in a fresh temporary directory, stopped on exit."""
    root = Path(tempfile.mkdtemp(prefix="shmblock-ceph-", dir=parent))
    cluster = CephCluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


# -- pytest fixtures (imported by tests/conftest.py) -----------------------------------

_started: list[float] = []


@dataclass(frozen=True)
class S3Endpoint:
    """Where the test gateway listens and the keys of its one user."""

    endpoint_url: str
    access_key: str
    secret_key: str
    cluster: CephCluster

    @property
    def env(self) -> dict[str, str]:
        return self.cluster.env()

    def client(self) -> Any:
        """A plain boto3 client (for set-up and read-back around the store under test)."""
        return boto3.client(
            "s3", endpoint_url=self.endpoint_url, aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key, region_name="us-east-1",
            config=botocore.config.Config(s3={"addressing_style": "path"},
                                          connect_timeout=10, read_timeout=60,
                                          retries={"total_max_attempts": 5}))


@dataclass(frozen=True)
class S3Bucket:
    """A fresh bucket: ``url`` is ``s3://bucket/prefix``; ``env`` has the credentials."""

    url: str
    bucket: str
    prefix: str
    env: dict[str, str]
    s3: S3Endpoint


@pytest.fixture(scope="session")
def ceph_cluster() -> Iterator[CephCluster]:
    """One real Ceph cluster for the whole session, started by the first test asking."""
    missing = missing_tools()
    if missing:
        why = (f"the Ceph packages {', '.join(missing)} are not installed "
               "(`make tools` installs them)")
        if os.environ.get("CI"):
            pytest.fail(why)        # CI installs them: a skip there would hide a gap
        pytest.skip(why)
    # A short path: Unix socket paths (admin sockets) are limited to 107 bytes.
    with running_cluster() as cluster:
        _started.append(cluster.startup_seconds)
        yield cluster


@pytest.fixture(scope="session")
def ceph_s3(ceph_cluster: CephCluster) -> S3Endpoint:
    return S3Endpoint(ceph_cluster.endpoint_url, ceph_cluster.access_key,
                      ceph_cluster.secret_key, ceph_cluster)


@pytest.fixture
def s3_bucket(ceph_s3: S3Endpoint, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3Bucket]:
    """A new empty bucket, its credentials in the environment; emptied and removed after."""
    if not ceph_s3.cluster.rgw_running:
        ceph_s3.cluster.start_rgw()     # a fault test that failed before restarting it
    for name, value in ceph_s3.env.items():
        monkeypatch.setenv(name, value)
    bucket = f"sbt-{uuid.uuid4().hex[:16]}"
    client = ceph_s3.client()
    client.create_bucket(Bucket=bucket)
    try:
        yield S3Bucket(f"s3://{bucket}/backups", bucket, "backups/", ceph_s3.env, ceph_s3)
    finally:
        if not ceph_s3.cluster.rgw_running:
            ceph_s3.cluster.start_rgw()
        # Empty and remove it so memstore memory does not grow over the session.
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=bucket, Delete={"Objects": keys})
        client.delete_bucket(Bucket=bucket)
        client.close()


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Say how long the cluster took to start (CI time is watched)."""
    if _started:
        terminalreporter.write_line(
            f"test Ceph cluster (tests/ceph.py): started in {_started[0]:.1f} s")


def main() -> None:
    if len(sys.argv) > 1:
        # Any argument (--help included) is a question, not a request for a cluster.
        print("usage: python -m tests.ceph\n\nStart a single-node Ceph (monitor, memstore "
              "OSD, radosgw) on 127.0.0.1, print its S3 endpoint and keys as JSON, and "
              "keep it until SIGINT/SIGTERM.", file=sys.stderr)
        raise SystemExit(0 if sys.argv[1] in ("-h", "--help") else 2)
    with running_cluster() as cluster:
        print(json.dumps({"endpoint_url": cluster.endpoint_url,
                          "access_key": cluster.access_key,
                          "secret_key": cluster.secret_key,
                          "conf": str(cluster.conf),
                          "mon_host": cluster.mon_host,
                          "startup_seconds": round(cluster.startup_seconds, 1)}), flush=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
        signal.sigwait({signal.SIGINT, signal.SIGTERM})


if __name__ == "__main__":
    main()
