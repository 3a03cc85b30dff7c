"""HTTP(S) range reads: object stores exposed over HTTP, and the benchmark's remote storage.

HTTP has no directory listing, so a model's files are the ones its crc32.txt names (each
stat'd with HEAD), or, failing that, a JSON directory index (nginx ``autoindex_format json``).
Connections are pooled and kept alive; transient failures are retried with backoff, resuming
a range where it broke off.
"""

from __future__ import annotations

import email.utils
import json
import logging
import time
from urllib.parse import quote, unquote, urljoin, urlsplit

import urllib3
from urllib3.exceptions import HTTPError
from urllib3.util import parse_url

from .._errors import SourceError, SourceNotFoundError
from ..manifest import FileStat, check_relative_path, parse_crc32
from ._base import Source

__all__ = ["HttpSource"]

log = logging.getLogger("mows.sources")

_TRANSIENT = frozenset({408, 425, 429, 500, 502, 503, 504})
_REDIRECT = frozenset({301, 302, 303, 307, 308})
MAX_REDIRECTS = 5
_DEFAULT_PORT = {"http": 80, "https": 443}


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) with the default port filled in; ValueError for a bad port."""
    u = urlsplit(url)
    scheme = u.scheme.lower()
    return scheme, u.hostname or "", u.port or _DEFAULT_PORT.get(scheme, 0)


def _origin3(url: str) -> tuple[str, str, int]:
    """The same as urllib3 parses it (the parser that connects)."""
    u = parse_url(url)
    scheme = (u.scheme or "").lower()
    return scheme, (u.host or "").lower(), u.port or _DEFAULT_PORT.get(scheme, 0)


class HttpSource(Source):
    def __init__(
        self,
        location: str,
        *,
        connections: int = 8,
        retries: int = 5,
        backoff: float = 0.2,
        timeout: float = 30.0,
        crc32_file: str = "crc32.txt",
    ) -> None:
        self.url = location.rstrip("/")
        self._origin = _origin(self.url)
        self._base = unquote(urlsplit(self.url).path).rstrip("/")  # the model's URL prefix
        self._retries = retries
        self._backoff = backoff
        self._crc32_file = crc32_file
        self._pool = urllib3.PoolManager(
            num_pools=4,
            maxsize=connections,
            block=True,
            retries=False,  # retried here, so a broken body resumes instead of restarting
            timeout=urllib3.Timeout(connect=10.0, read=timeout),
        )

    def close(self) -> None:
        self._pool.clear()

    def _file_url(self, path: str) -> str:
        rel = check_relative_path(path, self.url)
        return f"{self.url}/{quote(rel, safe='/')}"

    def _request(
        self,
        method: str,
        path: str,
        headers: dict[str, str] | None = None,
        stream: bool = False,
        retries: int | None = None,
    ) -> urllib3.BaseHTTPResponse:
        url = self._file_url(path) if path else self.url + "/"
        delay = self._backoff
        retries = self._retries if retries is None else retries
        for attempt in range(retries + 1):
            try:
                resp = self._send(method, url, path, headers, stream)
            except HTTPError as e:
                err = f"{type(e).__name__}: {e}"
            else:
                if resp.status not in _TRANSIENT:
                    return resp
                err = f"HTTP {resp.status}"
                resp.drain_conn()
                resp.release_conn()
            if attempt == retries:
                raise SourceError(self.url, path, f"{err} after {attempt + 1} attempts")
            log.debug("%s %s: %s, retrying in %.2fs", method, url, err, delay)
            time.sleep(delay)
            delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(
        self, method: str, url: str, path: str, headers: dict[str, str] | None, stream: bool
    ) -> urllib3.BaseHTTPResponse:
        """One request, following redirects by hand: only to the same origin and under the
        model's URL prefix (urllib3 would follow one to any host, headers and all)."""
        for _ in range(MAX_REDIRECTS + 1):
            resp = self._pool.request(
                method, url, headers=headers, preload_content=not stream, redirect=False
            )
            location = resp.headers.get("Location") if resp.status in _REDIRECT else None
            if location is None:
                return resp
            resp.drain_conn()
            resp.release_conn()
            url = self._check_redirect(urljoin(url, location), path)
        raise SourceError(self.url, path, f"more than {MAX_REDIRECTS} redirects")

    def _check_redirect(self, target: str, path: str) -> str:
        # urllib and urllib3 split some URLs differently ("http://evil\\@good/": urllib
        # sees host good, urllib3 connects to evil): refuse what they could disagree on.
        authority = urlsplit(target).netloc
        if "\\" in target or "@" in authority or any(ord(c) < 0x21 for c in target):
            raise SourceError(self.url, path, f"refused a redirect to an ambiguous URL {target!r}")
        try:
            origin = _origin(target)
            if origin != _origin3(target):
                raise ValueError("URL parsers disagree")
        except ValueError:
            raise SourceError(self.url, path, f"redirect to a malformed URL {target!r}") from None
        if origin != self._origin:
            scheme, host, port = origin
            raise SourceError(
                self.url, path, f"refused a redirect to another origin: {scheme}://{host}:{port}"
            )
        # Decoded first: "%2e%2e/" is "../" to the server that receives it.
        decoded = unquote(urlsplit(target).path)
        segments = decoded.split("/")
        if (
            not (decoded + "/").startswith(self._base + "/")
            or "." in segments
            or ".." in segments
            or "\\" in decoded
        ):
            raise SourceError(
                self.url, path, f"refused a redirect outside the model's URL prefix: {decoded}"
            )
        return target

    def _check(self, resp: urllib3.BaseHTTPResponse, path: str, ok: tuple[int, ...]) -> None:
        if resp.status in ok:
            return
        resp.drain_conn()
        resp.release_conn()
        if resp.status in (404, 410):
            raise SourceNotFoundError(self.url, path, f"HTTP {resp.status}")
        raise SourceError(self.url, path, f"HTTP {resp.status}")

    def stat(self, path: str) -> FileStat:
        resp = self._request("HEAD", path)
        self._check(resp, path, (200,))
        length = resp.headers.get("Content-Length")
        if length is None or not length.isdigit():
            raise SourceError(self.url, path, "response has no valid Content-Length")
        mtime_ns = 0
        modified = resp.headers.get("Last-Modified")
        if modified:
            try:
                mtime_ns = int(email.utils.parsedate_to_datetime(modified).timestamp()) * 10**9
            except (TypeError, ValueError):
                mtime_ns = 0
        return FileStat(path, int(length), mtime_ns)

    def read_file(self, path: str, limit: int) -> bytes:
        """One GET, the body bounded by ``limit``. Retried once only: a warm open that asks
        whether the model changed must not wait out the full backoff of a dead origin."""
        resp = self._request("GET", path, stream=True, retries=min(1, self._retries))
        try:
            self._check(resp, path, (200,))
            length = resp.headers.get("Content-Length")
            if length is not None and length.isdigit() and int(length) > limit:
                raise SourceError(self.url, path, f"file of {length} bytes exceeds {limit} bytes")
            body = resp.read(limit + 1)
        except HTTPError as e:
            raise SourceError(self.url, path, f"body broken: {e}") from None
        finally:
            resp.release_conn()
        if len(body) > limit:
            raise SourceError(self.url, path, f"file exceeds {limit} bytes")
        return bytes(body)

    def list_files(self) -> list[FileStat]:
        try:
            crc = self.stat(self._crc32_file)
        except SourceNotFoundError:
            return self._list_index("")
        names = parse_crc32(self.read_range(crc.path, 0, crc.size), f"{self.url}/{crc.path}")
        return [crc, *(self.stat(name) for name in sorted(names))]

    def _list_index(self, prefix: str) -> list[FileStat]:
        resp = self._request("GET", prefix.rstrip("/"))
        if resp.status != 200:
            raise SourceError(
                self.url,
                prefix,
                f"HTTP {resp.status}: no crc32.txt and no JSON directory index to list files",
            )
        try:
            entries = json.loads(resp.data)
            assert isinstance(entries, list)
        except (ValueError, AssertionError):
            raise SourceError(
                self.url, prefix, "no crc32.txt and the directory index is not JSON"
            ) from None
        out: list[FileStat] = []
        for e in entries:
            if not isinstance(e, dict) or not isinstance(e.get("name"), str):
                raise SourceError(self.url, prefix, "malformed directory index entry")
            rel = prefix + e["name"]
            if e.get("type") == "directory":
                out.extend(self._list_index(rel + "/"))
            elif e.get("type") == "file":
                out.append(self.stat(rel))
        return out

    def read_into(self, path: str, offset: int, buf: memoryview) -> None:
        view = buf.cast("B") if buf.format != "B" else buf
        done, attempts = 0, 0
        while done < len(view):
            start = offset + done
            end = offset + len(view) - 1
            resp = self._request("GET", path, {"Range": f"bytes={start}-{end}"}, stream=True)
            if resp.status == 416:
                resp.release_conn()
                raise SourceError(
                    self.url,
                    path,
                    f"short read: {done} of {len(view)} bytes at offset {offset} (HTTP 416)",
                )
            self._check(resp, path, (206,))
            got = 0
            try:
                while done < len(view):
                    n = resp.readinto(view[done:])
                    if not n:
                        break
                    done += n
                    got += n
            except HTTPError as e:
                attempts += 1
                if attempts > self._retries:
                    raise SourceError(self.url, path, f"body broken: {e}") from None
                log.debug("resuming %s at %d after %s", path, offset + done, e)
                continue
            finally:
                resp.release_conn()
            if done < len(view) and got == 0:
                raise SourceError(
                    self.url, path, f"short read: {done} of {len(view)} bytes at offset {offset}"
                )
