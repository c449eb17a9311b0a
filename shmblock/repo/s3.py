"""The S3 backend of :class:`~shmblock.repo.store.ObjectStore`: ``s3://bucket/prefix``.

Any S3-compatible store: AWS, Ceph's RADOS Gateway (tested against a real one), MinIO.
The client is boto3, chosen by measurement (README, "Dependencies and why"): against
the local RADOS Gateway it moved as many bytes as obstore, and it brings the whole AWS
configuration chain users already have.

Configuration, as every AWS tool reads it: credentials and region from
``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``/``AWS_SESSION_TOKEN``,
``AWS_PROFILE``, ``~/.aws/credentials`` and ``~/.aws/config``; the endpoint from
``endpoint_url=`` or ``AWS_ENDPOINT_URL_S3``/``AWS_ENDPOINT_URL``. With a custom
endpoint the addressing style defaults to *path* (``http://host/bucket/key``), which is
what Ceph and MinIO serve without wildcard DNS; ``addressing_style="virtual"`` overrides.

Failures. Every request has a connect and a read timeout. A request that fails in a way
that may pass — connection refused or reset, a timeout, HTTP 5xx, throttling (429,
``SlowDown``) — is retried with exponential back-off and jitter, bounded both in
attempts (``retries``) and in total time (``deadline`` seconds per operation, which
also bounds a body trickling in byte by byte); botocore's own retry loop is switched off
so there is exactly one, visible, bound. What remains is mapped to store.py's errors::

    refused credentials (403, InvalidAccessKeyId, SignatureDoesNotMatch)
        -> StoreAccessDenied, naming the endpoint
    NoSuchBucket                                     -> NoSuchBucket, naming the bucket
    no object under the key (get)                    -> ObjectMissing
    still failing after the retries, unreachable     -> StoreUnavailable
    anything else                                    -> StoreError

Threads: one boto3 client is thread-safe; its connection pool is bounded by
``max_connections`` (parallel uploads beyond that wait for a connection).
"""

from __future__ import annotations

import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any, Literal, TypeVar
from urllib.parse import urlsplit

import boto3
import botocore.config
import botocore.exceptions

from shmblock.errors import UsageError
from shmblock.repo.store import (
    NoSuchBucket,
    ObjectInfo,
    ObjectMissing,
    ObjectStore,
    StoreAccessDenied,
    StoreError,
    StoreUnavailable,
)

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client
    from mypy_boto3_s3.type_defs import ListObjectsV2OutputTypeDef

T = TypeVar("T")

#: Error codes that mean "these credentials are refused" (S3 and RGW spellings).
_DENIED = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch",
                     "InvalidToken", "ExpiredToken", "TokenRefreshRequired",
                     "InvalidClientTokenId", "AllAccessDisabled", "403"})
#: Error codes worth another attempt (besides every 5xx).
_TRANSIENT = frozenset({"SlowDown", "Throttling", "ThrottlingException", "RequestTimeout",
                        "RequestTimeTooSkewed", "InternalError", "ServiceUnavailable",
                        "TooManyRequests", "429"})
_MISSING = frozenset({"NoSuchKey", "404", "NotFound"})

#: Bytes read from a response body per call: the deadline is checked between pieces, so
#: a reply trickling at R bytes/s overshoots it by at most _READ_PIECE / R.
_READ_PIECE = 64 << 10


def parse_s3_url(url: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` → ``("bucket", "some/prefix/")`` (prefix may be "")."""
    parts = urlsplit(url)
    if parts.scheme != "s3":
        raise UsageError(f"not an S3 URL (expected s3://bucket/prefix): {url!r}")
    bucket = parts.netloc
    # The S3 bucket naming rules, checked loosely: a clear error beats a 400 later.
    if not (3 <= len(bucket) <= 63) or not all(c.isalnum() or c in "-._" for c in bucket) \
            or not bucket[0].isalnum() or bucket != bucket.lower():
        raise UsageError(f"bad bucket name {bucket!r} in {url!r} (3-63 characters: "
                         "lower-case letters, digits, '-', '.')")
    if parts.query or parts.fragment:
        raise UsageError(f"an S3 URL has no query or fragment: {url!r}")
    prefix = parts.path.strip("/")
    if "//" in prefix:
        raise UsageError(f"empty path component in {url!r}")
    return bucket, (prefix + "/" if prefix else "")


class S3Store:
    """An :class:`ObjectStore` on one bucket and key prefix of an S3-compatible store."""

    #: Keys per LIST request (S3's maximum; tests lower it to exercise continuation).
    list_page_size = 1000

    def __init__(self, url: str, *, endpoint_url: str | None = None,
                 addressing_style: str | None = None, region: str | None = None,
                 profile: str | None = None, connect_timeout: float = 10.0,
                 timeout: float = 60.0, retries: int = 5, deadline: float = 300.0,
                 backoff: float = 0.5, max_backoff: float = 10.0,
                 max_connections: int = 16, sign_payload: bool | None = None) -> None:
        self.bucket, self.prefix = parse_s3_url(url)
        self.url = url
        if addressing_style not in (None, "path", "virtual", "auto"):
            raise UsageError(f"addressing style must be path, virtual or auto, "
                             f"not {addressing_style!r}")
        if retries < 1 or deadline <= 0 or timeout <= 0 or connect_timeout <= 0:
            raise UsageError("retries must be >= 1 and the timeouts positive")
        self.retries = retries
        self.deadline = deadline
        self.backoff = backoff
        self.max_backoff = max_backoff
        try:
            session = boto3.session.Session(profile_name=profile, region_name=region)
        except botocore.exceptions.ProfileNotFound as exc:
            raise UsageError(f"no AWS profile {profile!r}: {exc}") from exc
        endpoint = endpoint_url or _configured_endpoint(session)
        style: Literal["auto", "virtual", "path"] = (
            "path" if addressing_style == "path" or (not addressing_style and endpoint)
            else "virtual" if addressing_style == "virtual" else "auto")
        self.addressing_style = style
        self.sign_payload = (sign_payload if sign_payload is not None
                             else not (endpoint or "https:").startswith("https:"))
        config = botocore.config.Config(
            connect_timeout=connect_timeout, read_timeout=timeout,
            # One retry loop, ours (bounded in count and time, see _call).
            retries={"total_max_attempts": 1, "mode": "standard"},
            max_pool_connections=max_connections,
            # SigV4 hashes the whole body into the signature; over TLS that duplicates
            # what TLS already guarantees and doubled the client's CPU per byte (README,
            # "Dependencies and why"), so only plain-HTTP endpoints get it.
            s3={"addressing_style": style, "payload_signing_enabled": self.sign_payload},
            # Checksums only when an operation requires them: the flexible-checksum
            # headers newer botocore adds by default are not understood by every
            # S3-compatible store, and our chunks are content-addressed and verified.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            # Signature v4 signs in some region; us-east-1 is what S3-compatibles expect
            # when none is configured.
            region_name=session.region_name or "us-east-1",
        )
        try:
            self._client: S3Client = session.client("s3", endpoint_url=endpoint,
                                                    config=config)
        except ValueError as exc:
            raise UsageError(f"bad S3 endpoint {endpoint!r}: {exc}") from exc
        self.endpoint = str(self._client.meta.endpoint_url)
        self._closed = threading.Event()
        #: The bucket answered once (a plain flag: a race only costs an extra HEAD).
        self._bucket_seen = False

    def __repr__(self) -> str:
        return f"S3Store({self.url!r}, endpoint_url={self.endpoint!r})"

    # -- ObjectStore --------------------------------------------------------------------

    def put(self, key: str, data: bytes | memoryview) -> None:
        body = bytes(data)  # botocore wants bytes (it may re-send them on a retry)
        self._call("put", key, lambda _deadline: self._client.put_object(
            Bucket=self.bucket, Key=self._key(key), Body=body))

    def get(self, key: str) -> bytes:
        def attempt(op_deadline: float) -> bytes:
            resp = self._client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = resp["Body"]
            pieces = []
            try:
                while piece := body.read(_READ_PIECE):
                    pieces.append(piece)
                    if time.monotonic() > op_deadline:
                        raise _DeadlinePassed
            finally:
                body.close()
            return b"".join(pieces)
        return self._call("get", key, attempt)

    def head(self, key: str) -> ObjectInfo | None:
        try:
            resp = self._call("head", key, lambda _deadline: self._client.head_object(
                Bucket=self.bucket, Key=self._key(key)))
        except ObjectMissing:
            # A HEAD reply has no body, so "no such bucket" and "no such key" are the same
            # bare 404: ask about the bucket once, or a missing bucket reads as "no chunk".
            if not self._bucket_seen:
                self._call("head", "", lambda _deadline: self._client.head_bucket(
                    Bucket=self.bucket))
                self._bucket_seen = True
            return None
        return ObjectInfo(key, int(resp["ContentLength"]), resp["LastModified"].timestamp())

    def list(self, prefix: str) -> Iterator[ObjectInfo]:
        full = self._key(prefix, allow_empty=True)

        def page_after(token: str | None) -> Callable[[float], ListObjectsV2OutputTypeDef]:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full,
                                      "MaxKeys": self.list_page_size}
            if token:
                kwargs["ContinuationToken"] = token
            return lambda _deadline: self._client.list_objects_v2(**kwargs)

        token: str | None = None
        while True:
            page = self._call("list", prefix, page_after(token))
            # S3 lists in UTF-8 binary key order, which is str order for our keys.
            for item in page.get("Contents", []):
                yield ObjectInfo(item["Key"][len(self.prefix):], int(item["Size"]),
                                 item["LastModified"].timestamp())
            if not page.get("IsTruncated"):
                return
            token = page.get("NextContinuationToken")
            if not token:
                raise StoreError(f"{self._where('list', prefix)}: the store said the "
                                 "listing is truncated but gave no continuation token")

    def put_if_absent(self, key: str, data: bytes | memoryview) -> bool:
        """Create ``key`` only if no object is there (``If-None-Match: *``; Ceph since
        Pacific, AWS, MinIO). True when the key now holds ``data``; False when another
        object was there first. Safe to retry: if an earlier attempt of this call stored
        the object but its reply was lost, the retry's "already there" is checked
        against ``data`` (an identical object is as good as ours, for unique keys).

        Not part of :class:`ObjectStore` (yet): for manifests and lease objects that
        must never be overwritten by a concurrent writer.
        """
        body = bytes(data)
        try:
            self._call("put", key, lambda _deadline: self._client.put_object(
                Bucket=self.bucket, Key=self._key(key), Body=body, IfNoneMatch="*"))
        except _AlreadyThere:
            try:
                return self.get(key) == body
            except ObjectMissing:       # deleted in between: nobody holds the key now
                return self.put_if_absent(key, body)
        return True

    def delete(self, key: str) -> None:
        self._call("delete", key, lambda _deadline: self._client.delete_object(
            Bucket=self.bucket, Key=self._key(key)))

    def close(self) -> None:
        if not self._closed.is_set():
            self._closed.set()
            self._client.close()

    def __enter__(self) -> S3Store:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- helpers ------------------------------------------------------------------------

    def _key(self, key: str, allow_empty: bool = False) -> str:
        if not isinstance(key, str) or key.startswith("/") or (not key and not allow_empty):
            raise UsageError(f"bad object key {key!r} (non-empty, no leading '/')")
        return self.prefix + key

    def _where(self, op: str, key: str) -> str:
        return f"S3 {op} s3://{self.bucket}/{self.prefix}{key} at {self.endpoint}"

    def _call(self, op: str, key: str, fn: Callable[[float], T]) -> T:
        """Run one request with bounded retries; map every failure to a store error."""
        if self._closed.is_set():
            raise StoreError(f"{self._where(op, key)}: the store is closed")
        start = time.monotonic()
        op_deadline = start + self.deadline
        last = "no attempt made"
        for attempt in range(1, self.retries + 1):
            try:
                return fn(op_deadline)
            except _DeadlinePassed:
                last = f"the response took longer than {self.deadline:g} s"
                break
            except botocore.exceptions.ClientError as exc:
                err = exc.response.get("Error", {})
                code = str(err.get("Code", ""))
                status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
                if code in ("PreconditionFailed", "ConditionalRequestConflict") \
                        or status == 412:
                    raise _AlreadyThere from exc
                if code == "NoSuchBucket" or (status == 404 and op == "head" and not key):
                    raise NoSuchBucket(f"{self._where(op, key)}: no bucket {self.bucket!r} "
                                       "(create it first)") from exc
                if code in _MISSING or (status == 404 and op in ("head", "get")):
                    raise ObjectMissing(f"{self._where(op, key)}: no such object") from exc
                if code in _DENIED or status == 403:
                    raise StoreAccessDenied(
                        f"{self._where(op, key)}: {self.endpoint} refused the credentials "
                        f"({code or status}: {err.get('Message') or 'access denied'}); check "
                        "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or the AWS profile") from exc
                if not (status >= 500 or code in _TRANSIENT):
                    raise StoreError(f"{self._where(op, key)}: {code or status}: "
                                     f"{err.get('Message') or exc}") from exc
                last = f"HTTP {status} {code}".strip()
            except (botocore.exceptions.NoCredentialsError,
                    botocore.exceptions.PartialCredentialsError,
                    botocore.exceptions.CredentialRetrievalError) as exc:
                raise StoreAccessDenied(f"{self._where(op, key)}: no usable credentials "
                                        f"for {self.endpoint}: {exc}") from exc
            except botocore.exceptions.SSLError as exc:
                raise StoreUnavailable(f"{self._where(op, key)}: TLS failed: {exc}") from exc
            except (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError,
                    botocore.exceptions.IncompleteReadError) as exc:
                last = f"{type(exc).__name__}: {exc}"
            except botocore.exceptions.BotoCoreError as exc:
                raise StoreError(f"{self._where(op, key)}: {exc}") from exc
            if attempt == self.retries:
                break
            # Exponential back-off with full jitter (the AWS architecture blog's advice),
            # never sleeping past the operation's deadline.
            pause = random.uniform(0, min(self.max_backoff, self.backoff * 2 ** (attempt - 1)))
            if time.monotonic() + pause >= op_deadline:
                break
            if self._closed.wait(pause):
                break
        raise StoreUnavailable(
            f"{self._where(op, key)}: unavailable after {attempt} attempt"
            f"{'s' if attempt > 1 else ''} in {time.monotonic() - start:.1f} s "
            f"(last: {last})")


class _DeadlinePassed(Exception):
    """Raised inside an attempt when the operation ran past its total time."""


class _AlreadyThere(Exception):
    """A conditional put found an object under the key (HTTP 412)."""


def _configured_endpoint(session: boto3.session.Session) -> str | None:
    # botocore resolves AWS_ENDPOINT_URL(_S3) and the config file's endpoint_url itself;
    # we only need to know whether one is set, to pick path-style addressing.
    value = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if value:
        return value
    try:
        scoped = session._session.get_scoped_config()
    except botocore.exceptions.BotoCoreError:
        return None
    url = scoped.get("endpoint_url")
    return str(url) if url else None


def open_store(url: str, **options: Any) -> ObjectStore:
    """The object store for ``url`` (``s3://bucket/prefix``); options go to its class."""
    scheme = urlsplit(url).scheme
    if scheme == "s3":
        return S3Store(url, **options)
    raise UsageError(f"unsupported repository URL {url!r} (expected s3://bucket/prefix)")
