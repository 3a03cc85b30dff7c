"""S3 and S3-compatible object stores: ``s3://bucket/prefix`` model paths.

botocore (chosen by measurement, see the README) brings the standard AWS chain for
credentials and region (environment, shared config and profiles, web identity, instance
metadata), ``AWS_ENDPOINT_URL`` and both addressing styles. Its own retries are off: this
source retries 5xx and ``SlowDown`` with backoff itself, so a broken body resumes at the byte
where it stopped instead of starting the range again. Bodies are read with the socket's
``readinto`` straight into the caller's buffer (the pool's mapping), no intermediate copy.

The file list is the model's crc32.txt when there is one (a HEAD per file), else the bucket
listing under the prefix. Every file carries its ETag, so a rewritten object is a new version.
"""

from __future__ import annotations

import http.client
import logging
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import botocore.config
import botocore.exceptions
import botocore.session

from .._errors import ConfigError, SourceError, SourceNotFoundError
from ..manifest import FileStat, check_relative_path, parse_crc32
from ._base import Source

__all__ = ["S3Source"]

log = logging.getLogger("mows.sources")

T = TypeVar("T")

# Error codes worth another try: throttling and the store's own transient failures.
_TRANSIENT_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "RequestTimeout",
        "RequestTimeTooSkewed",
        "InternalError",
        "ServiceUnavailable",
        "503",
        "500",
    }
)
_NETWORK_ERRORS = (
    botocore.exceptions.ConnectionError,  # refused, DNS, TLS, connect timeout
    botocore.exceptions.HTTPClientError,  # connection closed, read timeout, broken body
)
_BODY_ERRORS = (*_NETWORK_ERRORS, botocore.exceptions.IncompleteReadError)
_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NoSuchBucket", "NotFound"})
_ADDRESSING = ("auto", "path", "virtual")


class _Transient(Exception):
    """A failure another attempt may not have: retried, then reported as ``reason``."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class S3Source(Source):
    """Objects under ``s3://bucket/prefix/``, read with parallel-safe ranged GETs.

    Options (the daemon's ``[sources]`` table; every one optional): ``s3_endpoint_url`` (a
    non-AWS store; else ``AWS_ENDPOINT_URL`` and the shared config), ``s3_endpoints`` (a table
    of ``"s3://bucket[/prefix]" = "URL"``, the longest match wins, for stores per model path),
    ``s3_region``, ``s3_profile``, ``s3_addressing_style`` (``auto``, ``path``, ``virtual``),
    and those shared with HTTP: ``connections``, ``retries``, ``backoff``, ``timeout``,
    ``crc32_file``.
    """

    def __init__(
        self,
        location: str,
        *,
        connections: int = 8,
        retries: int = 5,
        backoff: float = 0.2,
        timeout: float = 30.0,
        crc32_file: str = "crc32.txt",
        s3_endpoint_url: str = "",
        s3_endpoints: Mapping[str, str] | None = None,
        s3_region: str = "",
        s3_profile: str = "",
        s3_addressing_style: str = "auto",
    ) -> None:
        parts = urlsplit(location)
        if parts.scheme.lower() != "s3" or not parts.netloc:
            raise ConfigError(f"{location}: an S3 model path is s3://BUCKET[/PREFIX]")
        if parts.query or parts.fragment:
            raise ConfigError(f"{location}: an S3 model path has no query or fragment")
        if s3_addressing_style not in _ADDRESSING:
            raise ConfigError(
                f"s3_addressing_style: {s3_addressing_style!r} is not one of "
                + ", ".join(_ADDRESSING)
            )
        self.bucket = parts.netloc
        prefix = parts.path.strip("/")
        self.prefix = f"{prefix}/" if prefix else ""
        self.url = f"s3://{self.bucket}/{prefix}" if prefix else f"s3://{self.bucket}"
        self._retries = retries
        self._backoff = backoff
        self._crc32_file = crc32_file
        self._connections = connections
        self.endpoint_url = _pick_endpoint(self.url, s3_endpoint_url, s3_endpoints or {})
        self._client_args: dict[str, Any] = {
            "endpoint_url": self.endpoint_url or None,  # None: AWS_ENDPOINT_URL, config, AWS
            "region_name": s3_region or None,  # None: AWS_REGION, the profile's region
            "config": botocore.config.Config(
                max_pool_connections=connections,
                connect_timeout=10.0,
                read_timeout=timeout,
                retries={"total_max_attempts": 1},  # retried here (resumable bodies)
                s3={"addressing_style": s3_addressing_style},
            ),
        }
        self._profile = s3_profile or None
        self._lock = threading.Lock()
        self._s3: Any = None

    # -- the client, made on first use: credential lookups may take a while (instance
    # metadata) and their failures belong to a request that names the file
    def _client(self, path: str) -> Any:
        with self._lock:
            if self._s3 is None:
                try:
                    self._s3 = _create_client(self._profile, self._client_args)
                except botocore.exceptions.BotoCoreError as e:
                    raise SourceError(self.url, path, _one_line(str(e))) from None
            return self._s3

    def close(self) -> None:
        with self._lock:
            if self._s3 is not None:
                self._s3.close()
                self._s3 = None

    def _key(self, path: str) -> str:
        return self.prefix + check_relative_path(path, self.url)

    def _object(self, path: str) -> str:
        return f"s3://{self.bucket}/{self._key(path)}"

    def _call(self, path: str, fn: Callable[[Any], T], network_retries: int | None = None) -> T:
        """``fn(client)`` with transient failures retried with exponential backoff; failures
        to connect at all are retried at most ``network_retries`` times."""
        retries = self._retries
        delay = self._backoff
        for attempt in range(retries + 1):
            try:
                return fn(self._client(path))
            except _Transient as e:
                err = e.reason
            except botocore.exceptions.ClientError as e:
                if not _transient(e):
                    raise self._error(e, path) from None
                err = _describe(e)
            except _NETWORK_ERRORS as e:
                err = _one_line(str(e))
                if network_retries is not None and attempt >= network_retries:
                    raise SourceError(
                        self.url, path, f"{err} after {attempt + 1} attempts"
                    ) from None
            except botocore.exceptions.BotoCoreError as e:
                raise self._error(e, path) from None
            if attempt == retries:
                raise SourceError(self.url, path, f"{err} after {attempt + 1} attempts")
            log.debug("%s: %s, retrying in %.2fs", self._object(path), err, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _error(self, e: Exception, path: str) -> SourceError:
        """One line naming the problem; the model and object are named by SourceError."""
        what = self._object(path) if path else f"s3://{self.bucket}/{self.prefix}"
        if isinstance(
            e, botocore.exceptions.NoCredentialsError | botocore.exceptions.PartialCredentialsError
        ):
            return SourceError(
                self.url,
                path,
                "no AWS credentials found (looked in the environment, the shared config and "
                "credentials files, web identity and instance metadata)",
            )
        if isinstance(e, botocore.exceptions.NoRegionError):
            return SourceError(self.url, path, "no AWS region configured (AWS_REGION or s3_region)")
        if isinstance(e, botocore.exceptions.EndpointConnectionError):
            return SourceError(self.url, path, f"cannot reach the S3 endpoint: {_one_line(str(e))}")
        if not isinstance(e, botocore.exceptions.ClientError):
            return SourceError(self.url, path, _one_line(str(e)))
        code = str(e.response.get("Error", {}).get("Code", ""))
        headers = e.response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
        region = headers.get("x-amz-bucket-region", "")
        if code == "NoSuchBucket":
            return SourceNotFoundError(self.url, path, f"no such bucket {self.bucket!r}")
        if code in _NOT_FOUND_CODES:
            return SourceNotFoundError(self.url, path, f"no such object {what}")
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch"):
            return SourceError(
                self.url, path, f"access denied: the credentials are not valid here ({code})"
            )
        if code == "403":  # a HEAD's answer has no body to say more
            return SourceError(
                self.url, path, f"access denied to {what} (HTTP 403: credentials or permissions)"
            )
        if code in ("AccessDenied", "AllAccessDisabled", "ExpiredToken"):
            return SourceError(self.url, path, f"access denied to {what} ({code})")
        if code in ("PermanentRedirect", "301", "AuthorizationHeaderMalformed") or (
            code == "IllegalLocationConstraintException"
        ):
            where = f"the bucket is in region {region!r}" if region else "wrong region or endpoint"
            return SourceError(self.url, path, f"{where}; set AWS_REGION or s3_region ({code})")
        return SourceError(self.url, path, _describe(e))

    # -- the Source contract ---------------------------------------------------------------
    def stat(self, path: str) -> FileStat:
        key = self._key(path)
        head = self._call(path, lambda s3: s3.head_object(Bucket=self.bucket, Key=key))
        modified = head.get("LastModified")
        mtime_ns = int(modified.timestamp()) * 10**9 if modified is not None else 0
        return FileStat(path, int(head["ContentLength"]), mtime_ns, _etag(head.get("ETag")))

    def list_files(self) -> list[FileStat]:
        try:
            crc = self.stat(self._crc32_file)
        except SourceNotFoundError:  # (a HEAD cannot tell a missing bucket: the listing can)
            return self.list_objects()
        names = parse_crc32(self.read_file(crc.path, crc.size), f"{self.url}/{crc.path}")
        # A HEAD per file, several at once: large models have hundreds of shards.
        with ThreadPoolExecutor(min(self._connections, max(1, len(names)))) as ex:
            return [crc, *ex.map(self.stat, sorted(names))]

    def list_objects(self) -> list[FileStat]:
        """Every object under the prefix (the bucket listing, paged), crc32.txt or not."""

        def pages(s3: Any) -> list[dict[str, Any]]:
            paginator = s3.get_paginator("list_objects_v2")
            return list(paginator.paginate(Bucket=self.bucket, Prefix=self.prefix))

        out: list[FileStat] = []
        for page in self._call("", pages):
            for obj in page.get("Contents", ()):
                key: str = obj["Key"]
                if key.endswith("/"):  # a "directory" marker some tools create
                    continue
                rel = key[len(self.prefix) :]
                modified = obj.get("LastModified")
                mtime_ns = int(modified.timestamp()) * 10**9 if modified is not None else 0
                out.append(FileStat(rel, int(obj["Size"]), mtime_ns, _etag(obj.get("ETag"))))
        if not out:
            raise SourceNotFoundError(
                self.url, "", f"no objects under s3://{self.bucket}/{self.prefix}"
            )
        return out

    def read_file(self, path: str, limit: int) -> bytes:
        """One GET. An origin that cannot be reached is retried once only, so a warm open's
        revalidation fails fast (as over HTTP); throttling gets the full backoff."""
        key = self._key(path)

        def get(s3: Any) -> bytes:
            resp = s3.get_object(Bucket=self.bucket, Key=key)
            body = resp["Body"]
            try:
                if int(resp.get("ContentLength", 0)) > limit:
                    raise SourceError(self.url, path, f"file exceeds {limit} bytes")
                data: bytes = body.read(limit + 1)
            finally:
                body.close()
            if len(data) > limit:
                raise SourceError(self.url, path, f"file exceeds {limit} bytes")
            return data

        return self._call(path, get, network_retries=min(1, self._retries))

    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        key = self._key(path)
        done = 0

        def get(s3: Any) -> None:
            nonlocal done
            start, end = offset + done, offset + len(view) - 1
            try:
                resp = s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{end}")
            except botocore.exceptions.ClientError as e:
                if e.response.get("Error", {}).get("Code") == "InvalidRange":
                    raise SourceError(
                        self.url, path, f"short read: {done} of {len(view)} bytes at {offset}"
                    ) from None
                raise
            n, whole = _read_body(resp["Body"], view[done:])
            done += n
            if done < len(view):
                if whole:  # the object ended: the range lies (partly) past its end
                    raise SourceError(
                        self.url,
                        path,
                        f"short read: {done} of {len(view)} bytes at offset {offset}",
                    )
                raise _Transient(f"body broken after {n} bytes")  # resumed where it stopped

        self._call(path, get)


def _read_body(body: Any, view: memoryview) -> tuple[int, bool]:
    """Read the response into ``view`` until it ends or ``view`` is full: (bytes read, whether
    the body ended cleanly).

    http.client's ``readinto`` receives into the buffer itself (urllib3's and botocore's copy
    through a temporary bytes), which halves the CPU of a fill. A body that breaks returns
    what arrived, so the caller resumes at the next byte; the connection goes back to the
    pool only when the body was read to its end.
    """
    raw = getattr(body, "_raw_stream", None)
    fp = getattr(raw, "_fp", None)
    reader: Any = fp if isinstance(fp, http.client.HTTPResponse) else body
    got = 0
    try:
        while got < len(view):
            n = reader.readinto(view[got:])
            if not n:
                break
            got += n
    except (OSError, http.client.HTTPException, *_BODY_ERRORS) as e:
        log.debug("body broke after %d bytes: %s", got, e)
        body.close()
        return got, False
    if reader is fp:
        # http.client ends a body cut short without an error: its length left tells.
        if fp.length:
            body.close()
            return got, False
        if fp.isclosed() and raw is not None:
            raw.release_conn()
            return got, True
    body.close()
    return got, True


# Parsing botocore's service model costs ~0.1 s of CPU per session: the loader that caches
# it is shared, so the client of each further model path costs ~0.01 s. Sessions are not:
# each resolves credentials afresh (and a botocore session is not thread-safe).
_LOADER: list[Any] = []
_LOADER_LOCK = threading.Lock()


def _create_client(profile: str | None, args: dict[str, Any]) -> Any:
    session = botocore.session.Session(profile=profile)
    with _LOADER_LOCK:
        if _LOADER:
            session.register_component("data_loader", _LOADER[0])
        else:
            _LOADER.append(session.get_component("data_loader"))
    return session.create_client("s3", **args)


def _pick_endpoint(url: str, default: str, per_path: Mapping[str, str]) -> str:
    best = ""
    for prefix in per_path:
        p = prefix.rstrip("/")
        if (url == p or url.startswith(p + "/")) and len(p) > len(best):
            best = p
    return per_path[best] if best else default


def _transient(e: botocore.exceptions.ClientError) -> bool:
    code = str(e.response.get("Error", {}).get("Code", ""))
    status = int(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
    return code in _TRANSIENT_CODES or status >= 500 or status == 429


def _describe(e: botocore.exceptions.ClientError) -> str:
    err = e.response.get("Error", {})
    status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", "?")
    message = _one_line(str(err.get("Message", ""))) or "no message"
    return f"{err.get('Code', 'error')} (HTTP {status}): {message}"


def _etag(value: object) -> str:
    return str(value).strip('"') if value else ""


def _one_line(text: str) -> str:
    return " ".join(text.split())
