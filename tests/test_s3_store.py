"""The S3 object store (shmblock/repo/s3.py) against a real Ceph RADOS Gateway.

* The :class:`ObjectStore` contract, checked against :class:`MemoryStore` as the model,
  with read-back around the store (a plain boto3 client sees the keys under the prefix).
* Faults, each ending in one clear error within a bounded time: radosgw killed in the
  middle of parallel uploads (StoreUnavailable after bounded retries; the same store
  works again once it is back), wrong credentials (StoreAccessDenied naming the
  endpoint), a missing bucket (NoSuchBucket naming it), and replies that are late,
  trickling or stalled (tests/tcp_proxy.py; timeouts, retries with back-off, a bound on
  the total time); 5xx and other 4xx replies from a scripted fake endpoint (what a real
gateway will not produce on demand). The unit tests at the top need no cluster.
"""

from __future__ import annotations

import http.server
import random
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from shmblock.errors import UsageError
from shmblock.repo.s3 import S3Store, open_store, parse_s3_url
from shmblock.repo.store import (
    MemoryStore,
    NoSuchBucket,
    ObjectMissing,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
)
from tests.ceph import CephCluster, S3Bucket
from tests.tcp_proxy import SlowProxy

MiB = 1 << 20

#: Short timeouts and back-off for the fault tests (the defaults are minutes).
FAST: dict[str, Any] = {"connect_timeout": 5.0, "timeout": 5.0, "retries": 3, "backoff": 0.05,
                        "max_backoff": 0.2}


# -- no cluster needed --------------------------------------------------------------------

@pytest.mark.parametrize(("url", "bucket", "prefix"), [
    ("s3://bucket", "bucket", ""),
    ("s3://bucket/", "bucket", ""),
    ("s3://my-bucket.x/a/b", "my-bucket.x", "a/b/"),
    ("s3://bkt/a/b/", "bkt", "a/b/"),
])
def test_parse_s3_url(url: str, bucket: str, prefix: str) -> None:
    assert parse_s3_url(url) == (bucket, prefix)


@pytest.mark.parametrize("url", ["http://bucket/x", "bucket/x", "s3://", "s3://ab",
                                 "s3://Upper/x", "s3://-bad/x", "s3://bkt/a//b",
                                 "s3://bkt/x?versionId=1", "s3://bk t/x"])
def test_bad_s3_url_is_a_usage_error(url: str) -> None:
    with pytest.raises(UsageError):
        parse_s3_url(url)


def test_open_store_refuses_other_schemes() -> None:
    with pytest.raises(UsageError, match="s3://"):
        open_store("file:///tmp/repo")


def test_bad_options_are_usage_errors() -> None:
    with pytest.raises(UsageError, match="addressing style"):
        S3Store("s3://bkt", endpoint_url="http://127.0.0.1:1", addressing_style="sideways")
    with pytest.raises(UsageError, match="retries"):
        S3Store("s3://bkt", endpoint_url="http://127.0.0.1:1", retries=0)


def test_bad_key_is_a_usage_error() -> None:
    with S3Store("s3://bkt/p", endpoint_url="http://127.0.0.1:1") as store, \
            pytest.raises(UsageError, match="key"):
        store.put("/abs", b"x")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def test_unreachable_endpoint_is_unavailable_after_bounded_retries(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    endpoint = f"http://127.0.0.1:{closed_port()}"
    with S3Store("s3://bkt/p", endpoint_url=endpoint, **FAST) as store:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="after 3 attempts") as info:
            store.get("k")
        assert time.monotonic() - began < 60
    assert endpoint in str(info.value)


def test_total_deadline_bounds_the_retries(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    # Back-off of up to 30 s per attempt, but only 1 s in all: it gives up early.
    with S3Store("s3://bkt/p", endpoint_url=f"http://127.0.0.1:{closed_port()}",
                 retries=50, backoff=30, max_backoff=30, deadline=1.0) as store:
        began = time.monotonic()
        with pytest.raises(StoreUnavailable):
            store.head("k")
        assert time.monotonic() - began < 30


class ScriptedS3(http.server.ThreadingHTTPServer):
    """A fake S3 endpoint answering from a script of (status, error code) replies; the
    last one repeats. Only for what a real gateway will not do on demand (5xx, 400)."""

    def __init__(self, replies: list[tuple[int, str]]) -> None:
        self.replies = replies
        self.requests = 0
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                status, code = server.replies[min(server.requests,
                                                  len(server.replies) - 1)]
                server.requests += 1
                body = b"" if status == 200 else (
                    f"<?xml version='1.0'?><Error><Code>{code}</Code>"
                    f"<Message>scripted</Message></Error>").encode()
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(body)

            do_GET = do_PUT = do_HEAD = do_DELETE = _answer  # noqa: N815

            def log_message(self, format: str, *args: Any) -> None:
                pass

        super().__init__(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"

    def close(self) -> None:
        self.shutdown()
        self.server_close()
        self.thread.join(timeout=10)


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "x")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "y")
    servers: list[ScriptedS3] = []

    def make(*replies: tuple[int, str]) -> ScriptedS3:
        servers.append(ScriptedS3(list(replies)))
        return servers[-1]
    yield make
    for server in servers:
        server.close()


def test_5xx_is_retried_then_unavailable(scripted: Any) -> None:
    server = scripted((503, "SlowDown"))
    with S3Store("s3://bkt/p", endpoint_url=server.url, **FAST) as store, \
            pytest.raises(StoreUnavailable, match=r"after 3 attempts.*503 SlowDown"):
        store.put("k", b"x")
    assert server.requests == 3


def test_a_passing_5xx_is_ridden_out(scripted: Any) -> None:
    server = scripted((500, "InternalError"), (502, ""), (200, ""))
    with S3Store("s3://bkt/p", endpoint_url=server.url, **FAST) as store:
        store.put("k", b"x")
    assert server.requests == 3


def test_put_if_absent_retried_after_a_lost_reply_is_ours(scripted: Any,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """The first attempt stored the object but its reply was lost (503); the retry finds
    it there (412) and recognises its own bytes."""
    server = scripted((503, "ServiceUnavailable"), (412, "PreconditionFailed"))
    with S3Store("s3://bkt/p", endpoint_url=server.url, **FAST) as store:
        monkeypatch.setattr(store, "get", lambda key: b"ours")
        assert store.put_if_absent("k", b"ours") is True
        monkeypatch.setattr(store, "get", lambda key: b"theirs")
        assert store.put_if_absent("k", b"ours") is False


def test_other_4xx_is_not_retried(scripted: Any) -> None:
    server = scripted((400, "InvalidArgument"))
    with S3Store("s3://bkt/p", endpoint_url=server.url, **FAST) as store, \
            pytest.raises(StoreError, match="InvalidArgument") as info:
        store.put("k", b"x")
    assert not isinstance(info.value, StoreUnavailable)
    assert server.requests == 1


def test_path_style_is_the_default_with_an_endpoint() -> None:
    with S3Store("s3://bkt", endpoint_url="http://127.0.0.1:1") as store:
        assert store.addressing_style == "path"
    with S3Store("s3://bkt", endpoint_url="http://127.0.0.1:1",
                 addressing_style="virtual") as store:
        assert store.addressing_style == "virtual"


def test_payload_is_signed_only_without_tls() -> None:
    with S3Store("s3://bkt", endpoint_url="http://127.0.0.1:1") as store:
        assert store.sign_payload
        assert store._client.meta.config.s3["payload_signing_enabled"] is True  # type: ignore[attr-defined]
    with S3Store("s3://bkt", endpoint_url="https://s3.example.org") as store:
        assert not store.sign_payload
        assert store._client.meta.config.s3["payload_signing_enabled"] is False  # type: ignore[attr-defined]


def test_endpoint_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with S3Store("s3://bkt") as store:
        assert store.endpoint == "http://127.0.0.1:9"
        assert store.addressing_style == "path"


# -- against the real gateway --------------------------------------------------------------

@pytest.fixture
def store(s3_bucket: S3Bucket) -> Iterator[S3Store]:
    with S3Store(s3_bucket.url, endpoint_url=s3_bucket.s3.endpoint_url) as s:
        yield s


def keys_around_the_store(s3_bucket: S3Bucket) -> dict[str, bytes]:
    """Every object in the bucket, read with a plain boto3 client (not the store)."""
    client = s3_bucket.s3.client()
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=s3_bucket.bucket):
        for item in page.get("Contents", []):
            out[item["Key"]] = client.get_object(Bucket=s3_bucket.bucket,
                                                 Key=item["Key"])["Body"].read()
    client.close()
    return out


@pytest.mark.ceph
def test_round_trip_and_read_back(store: S3Store, s3_bucket: S3Bucket) -> None:
    big = random.Random(1).randbytes(4 * MiB + 3)
    store.put("chunks/ab/abcdef", big)
    store.put("manifests/one", memoryview(b"manifest"))
    store.put("empty", b"")
    assert store.get("chunks/ab/abcdef") == big
    assert store.get("manifests/one") == b"manifest"
    assert store.get("empty") == b""
    info = store.head("chunks/ab/abcdef")
    assert info is not None and info.size == len(big) and info.key == "chunks/ab/abcdef"
    assert abs(info.mtime - time.time()) < 3600
    assert store.head("nope") is None
    with pytest.raises(ObjectMissing):
        store.get("nope")
    assert [i.key for i in store.list("")] == ["chunks/ab/abcdef", "empty", "manifests/one"]
    assert [i.key for i in store.list("man")] == ["manifests/one"]
    # The keys are where the URL says, as any S3 client sees them.
    assert keys_around_the_store(s3_bucket) == {
        "backups/chunks/ab/abcdef": big, "backups/manifests/one": b"manifest",
        "backups/empty": b""}
    store.delete("manifests/one")
    store.delete("manifests/one")          # deleting a missing key is not an error
    assert store.head("manifests/one") is None


@pytest.mark.ceph
def test_matches_the_memory_model(store: S3Store) -> None:
    """A random sequence of operations gives the same answers as MemoryStore."""
    model = MemoryStore()
    rng = random.Random(7)
    store.list_page_size = 3                   # listings need several pages
    keys = [f"k/{i:02d}" for i in range(12)] + ["k", "l/x"]
    for _ in range(80):
        op, key = rng.choice(["put", "put", "get", "head", "delete", "list"]), \
            rng.choice(keys)
        if op == "put":
            data = rng.randbytes(rng.randrange(0, 3000))
            store.put(key, data)
            model.put(key, data)
        elif op == "get":
            try:
                expected: bytes | None = model.get(key)
            except ObjectMissing:
                expected = None
            if expected is None:
                with pytest.raises(ObjectMissing):
                    store.get(key)
            else:
                assert store.get(key) == expected
        elif op == "head":
            got, want = store.head(key), model.head(key)
            assert (got and (got.key, got.size)) == (want and (want.key, want.size))
        elif op == "delete":
            store.delete(key)
            model.delete(key)
        else:
            prefix = key[:rng.randrange(0, len(key) + 1)]
            assert [(i.key, i.size) for i in store.list(prefix)] == \
                [(i.key, i.size) for i in model.list(prefix)]


@pytest.mark.ceph
def test_put_if_absent_never_overwrites(store: S3Store) -> None:
    assert store.put_if_absent("manifests/a", b"first") is True
    assert store.put_if_absent("manifests/a", b"second") is False
    assert store.put_if_absent("manifests/a", b"first") is True      # identical: fine
    assert store.get("manifests/a") == b"first"
    # Many writers race for one key: exactly one content wins, every caller agrees.
    contents = [f"writer {i}".encode() for i in range(8)]
    with ThreadPoolExecutor(8) as pool:
        won = list(pool.map(lambda c: store.put_if_absent("manifests/race", c), contents))
    assert won.count(True) == 1
    assert store.get("manifests/race") == contents[won.index(True)]


@pytest.mark.ceph
def test_parallel_puts_share_a_bounded_pool(s3_bucket: S3Bucket) -> None:
    blobs = {f"c/{i:03d}": random.Random(i).randbytes(256 * 1024) for i in range(48)}
    with S3Store(s3_bucket.url, endpoint_url=s3_bucket.s3.endpoint_url,
                 max_connections=4) as store, ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda kv: store.put(*kv), blobs.items()))
        got = dict(zip(blobs, pool.map(store.get, blobs), strict=True))
    assert got == blobs


@pytest.mark.ceph
def test_wrong_credentials_are_access_denied_naming_the_endpoint(
        s3_bucket: S3Bucket, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "not-the-secret")
    with S3Store(s3_bucket.url, **FAST) as store:
        with pytest.raises(StoreAccessDenied) as info:
            store.put("x", b"data")
        assert s3_bucket.s3.endpoint_url in str(info.value)
        assert "credentials" in str(info.value)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "nobody")
    with S3Store(s3_bucket.url, **FAST) as store, \
            pytest.raises(StoreAccessDenied, match="refused"):
        store.get("x")


@pytest.mark.ceph
def test_missing_bucket_names_it(s3_bucket: S3Bucket) -> None:
    url = "s3://sbt-no-such-bucket-here/p"
    with S3Store(url, **FAST) as store:
        for call in (lambda: store.put("x", b"1"), lambda: store.get("x"),
                     lambda: list(store.list("")), lambda: store.head("x"),
                     lambda: store.delete("x")):
            with pytest.raises(NoSuchBucket, match="sbt-no-such-bucket-here"):
                call()


@pytest.mark.ceph
def test_radosgw_killed_mid_upload(s3_bucket: S3Bucket, ceph_cluster: CephCluster) -> None:
    """Uploads in flight when radosgw dies fail with StoreUnavailable, in bounded time;
    the same store object works again once radosgw is back."""
    blob = random.Random(3).randbytes(4 * MiB)
    errors: list[BaseException] = []
    done = threading.Event()
    with S3Store(s3_bucket.url, **FAST) as store:
        def upload(worker: int) -> None:
            try:
                for i in range(10_000):
                    if done.is_set():
                        return
                    store.put(f"w{worker}/{i}", blob)
            except StoreError as exc:
                errors.append(exc)

        threads = [threading.Thread(target=upload, args=(w,)) for w in range(4)]
        try:
            for t in threads:
                t.start()
            deadline = time.monotonic() + 120
            while not list(store.list("w")) and time.monotonic() < deadline:
                time.sleep(0.2)                # some uploads finished: kill in the middle
            ceph_cluster.kill_rgw()
            killed = time.monotonic()
            for t in threads:
                t.join(timeout=120)
            assert not any(t.is_alive() for t in threads), "an upload hung"
            # Bounded: 3 attempts of at most 5+5 s plus back-off, with slack for the load.
            assert time.monotonic() - killed < 120
        finally:
            done.set()
            for t in threads:
                t.join(timeout=120)
            if not ceph_cluster.rgw_running:
                ceph_cluster.start_rgw()
        assert len(errors) == 4
        assert all(isinstance(e, StoreUnavailable) for e in errors), errors
        assert "unavailable after" in str(errors[0])
        # Back: the pooled connections are dead, the retries get through on new ones.
        store.put("after", b"back")
        assert store.get("after") == b"back"


@pytest.fixture
def proxy(ceph_cluster: CephCluster, s3_bucket: S3Bucket) -> Iterator[SlowProxy]:
    with SlowProxy("127.0.0.1", ceph_cluster.rgw_port) as p:
        yield p


def slow_store(s3_bucket: S3Bucket, proxy: SlowProxy, **options: Any) -> S3Store:
    return S3Store(s3_bucket.url, endpoint_url=proxy.url, **{**FAST, **options})


@pytest.mark.ceph
def test_stalled_replies_time_out_then_fail_clearly(s3_bucket: S3Bucket,
                                                    proxy: SlowProxy) -> None:
    with slow_store(s3_bucket, proxy) as store:
        store.put("x", b"fine")                    # through the proxy, unshaped
        proxy.stall = True
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="after 3 attempts") as info:
            store.get("x")
        elapsed = time.monotonic() - began
        # Three read timeouts of 5 s: at least that long, and bounded.
        assert 3 * 5 <= elapsed < 120, elapsed
        assert "Timeout" in str(info.value)
        proxy.normal()
        assert store.get("x") == b"fine"


@pytest.mark.ceph
def test_a_late_reply_is_retried_and_succeeds(s3_bucket: S3Bucket, proxy: SlowProxy) -> None:
    with slow_store(s3_bucket, proxy, retries=5) as store:
        store.put("x", b"data")
        proxy.stall = True
        before = proxy.connections
        # The stall ends while the store is retrying: a later attempt gets through.
        timer = threading.Timer(6.0, proxy.normal)
        timer.start()
        try:
            assert store.get("x") == b"data"
        finally:
            timer.cancel()
        assert proxy.connections > before          # it did reconnect and retry


@pytest.mark.ceph
def test_delay_below_the_timeout_is_only_slow(s3_bucket: S3Bucket, proxy: SlowProxy) -> None:
    with slow_store(s3_bucket, proxy, timeout=30.0) as store:
        proxy.delay = 0.5
        store.put("x", b"slow but fine")
        assert store.get("x") == b"slow but fine"


@pytest.mark.ceph
def test_trickling_body_is_bounded_by_the_deadline(s3_bucket: S3Bucket,
                                                   proxy: SlowProxy) -> None:
    """A reply that keeps coming, too slowly to ever hit the read timeout, is still cut
    off at the operation's deadline instead of taking hours."""
    with slow_store(s3_bucket, proxy, deadline=4.0) as store:
        store.put("big", bytes(2 * MiB))
        proxy.rate = 64 * 1024                     # 2 MiB would take 32 s
        began = time.monotonic()
        with pytest.raises(StoreUnavailable, match="longer than 4 s"):
            store.get("big")
        assert time.monotonic() - began < 60
