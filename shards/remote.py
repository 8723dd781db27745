"""Where a dataset lives: a local folder, ``http(s)://HOST/DIR/``,
``s3://BUCKET/PREFIX`` or a webdataset-style ``pipe:COMMAND`` whose ``{}`` is
replaced by a file's name relative to the dataset root (``pipe:aws s3 cp
s3://b/p/{} -``). This module is the one place that opens a remote file.

A remote dataset is the same layout as a local one (``manifest.json`` beside
the split folders); its shard names stay relative to the root and are plain
names (letters, digits, ``._+-`` and ``/``, no ``..``, no scheme): a manifest
cannot make a reader fetch anything outside its dataset.

Shards are streamed, never downloaded whole first. A stream that breaks
(connection reset, truncated body, a failing pipe command) is reopened at the
byte it had reached (an HTTP Range request; a server without ranges, or a
pipe, is read again from the start and the bytes already delivered are
skipped), ``RETRIES`` times with exponential backoff; then :class:`RemoteError`
names the URL, and the shard reader counts the shard's remaining samples as
corrupt. Not found / access denied / bad credentials are never retried.

S3 uses fsspec + s3fs (the ``remote`` extra); credentials come from the usual
AWS environment and profile, and ``AWS_ENDPOINT_URL`` (or
``AWS_ENDPOINT_URL_S3``) points at another endpoint (MinIO, moto, a proxy).
"""
from __future__ import annotations

import hashlib
import http.client
import io
import os
import re
import shlex
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Callable

URL_SCHEMES = ("http://", "https://", "s3://")
PIPE = "pipe:"
RETRIES = 4  # tries per stream position before the shard counts as corrupt
BACKOFF_S = 0.2  # first wait; doubled after each failed try
TIMEOUT_S = 60.0  # per connect / read on HTTP
MAX_MANIFEST_BYTES = 256 << 20  # a manifest is untrusted: bounded
# a shard name a manifest may hand a remote reader (no scheme, query, quoting, spaces)
_PLAIN_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]*(/[A-Za-z0-9_][A-Za-z0-9._+-]*)*")


class RemoteError(OSError):
    """A remote file cannot be read; the message is one line naming its URL."""


class RemoteMissing(RemoteError, FileNotFoundError):
    """404 / no such key / a pipe command that found nothing: never retried."""


class RemoteDenied(RemoteError, PermissionError):
    """401/403, bad S3 credentials: never retried."""


def is_remote(location: object) -> bool:
    """Whether ``location`` (a config value or command argument) names a
    dataset that is not a local path. A :class:`pathlib.Path` never does
    (``Path`` folds ``//``, so URLs must stay strings)."""
    return isinstance(location, str) and (location.startswith(URL_SCHEMES) or location.startswith(PIPE))


class RemoteRoot(str):
    """The root of a remote dataset; ``root / "train/shard-000000.tar"`` is the
    shard's URL (or pipe command). A ``str``, so it pickles to DataLoader
    workers and prints as the user wrote it."""

    def __new__(cls, location: str):
        if location.startswith(PIPE):
            if "{}" not in location:
                raise ValueError(f"{location}: a pipe: dataset needs '{{}}' where the file name goes "
                                 "(e.g. 'pipe:aws s3 cp s3://bucket/prefix/{} -')")
        elif not location.startswith(URL_SCHEMES):
            raise ValueError(f"{location}: not a remote location ({', '.join(URL_SCHEMES)} or {PIPE})")
        else:
            parts = urllib.parse.urlsplit(location)
            if not parts.netloc or parts.query or parts.fragment:
                raise ValueError(f"{location}: expected {parts.scheme}://HOST_OR_BUCKET/PREFIX without ?query or #")
            location = location.rstrip("/")
        return super().__new__(cls, location)

    def __truediv__(self, name: str) -> str:
        return member_url(self, name)


def dataset_root(location: str | os.PathLike):
    """A :class:`RemoteRoot` for a remote location, else a :class:`pathlib.Path`."""
    from pathlib import Path

    if isinstance(location, RemoteRoot):
        return location
    return RemoteRoot(location) if is_remote(location) else Path(location)


def name_problem(name: str) -> str | None:
    """Why a file name from a manifest may not be read below a remote root (None: it may)."""
    if not isinstance(name, str) or not _PLAIN_NAME.fullmatch(name):
        return "is not a plain relative name (letters, digits, '._+-', '/'; no scheme, query or spaces)"
    if ".." in name.split("/"):
        return "climbs out of the dataset directory with '..'"
    return None


def member_url(root: RemoteRoot, name: str) -> str:
    """The URL (or pipe command) of ``name`` below ``root``; a ValueError for a name
    that is not plain (:func:`name_problem`), so nothing outside the root is named."""
    problem = name_problem(name)
    if problem is not None:
        raise ValueError(f"{root}: file name {name[:120]!r} {problem}")
    if root.startswith(PIPE):
        return root.replace("{}", shlex.quote(name))
    return f"{root}/{name}"


# ---------------------------------------------------------------------------
# opening one remote file at a byte offset
# ---------------------------------------------------------------------------
class _SameOrigin(urllib.request.HTTPRedirectHandler):
    """Follow redirects only on the same scheme and host: a server may not send
    a reader to another machine."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        old, new = urllib.parse.urlsplit(req.full_url), urllib.parse.urlsplit(newurl)
        if (old.scheme, old.netloc) != (new.scheme, new.netloc):
            raise RemoteDenied(f"{req.full_url}: redirected to another host ({new.scheme}://{new.netloc})")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


_HTTP = urllib.request.build_opener(_SameOrigin)


def _http_open(url: str, offset: int):
    req = urllib.request.Request(url, headers={"Range": f"bytes={offset}-"} if offset else {})
    try:
        resp = _HTTP.open(req, timeout=TIMEOUT_S)
    except urllib.error.HTTPError as e:
        e.close()
        if e.code == 404 or e.code == 410:
            raise RemoteMissing(f"{url}: not found (HTTP {e.code})") from None
        if e.code in (401, 403):
            raise RemoteDenied(f"{url}: access denied (HTTP {e.code})") from None
        if e.code == 416:  # the offset is the end of the file
            return io.BytesIO(b"")
        if 400 <= e.code < 500:
            raise RemoteMissing(f"{url}: refused (HTTP {e.code} {e.reason})") from None
        raise ConnectionError(f"HTTP {e.code} {e.reason}") from None
    body = _HttpBody(resp)
    if offset and resp.status != 206:  # no range support: skip what was delivered
        _skip(body, offset)
    return body


class _HttpBody(io.RawIOBase):
    """An HTTP response body whose early end is an error: ``HTTPResponse.readinto``
    returns 0 when the server closes before Content-Length, like a clean end."""

    def __init__(self, resp):
        self.resp = resp

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.resp.readinto(b)
        if n == 0 and len(b) and self.resp.length:  # bytes announced but never sent
            raise http.client.IncompleteRead(b"", self.resp.length)
        return n

    def close(self) -> None:
        self.resp.close()
        super().close()


def s3_filesystem():
    """The s3fs filesystem of the environment's credentials and endpoint."""
    try:
        import s3fs
    except ImportError:
        raise RemoteError("s3:// datasets need s3fs: pip install 'biomtl[remote]'") from None
    endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    # cheap per open: fsspec caches one instance per arguments and process (a
    # forked DataLoader worker makes its own)
    return s3fs.S3FileSystem(client_kwargs={"endpoint_url": endpoint} if endpoint else {})


def _s3_open(url: str, offset: int):
    try:
        f = s3_filesystem().open(url, "rb", block_size=1 << 22, cache_type="readahead")
        if offset:
            f.seek(offset)
        return f
    except FileNotFoundError:
        raise RemoteMissing(f"{url}: not found (no such bucket or key)") from None
    except PermissionError as e:
        raise RemoteDenied(f"{url}: access denied ({_first_line(e)})") from None
    except RemoteError:
        raise
    except OSError as e:
        text = _first_line(e)
        if any(w in text for w in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied",
                                   "Forbidden", "403", "credentials")):
            raise RemoteDenied(f"{url}: access denied ({text})") from None
        raise ConnectionError(text) from None
    except Exception as e:  # botocore's NoCredentialsError and friends are not OSErrors
        if "credential" in type(e).__name__.lower() or "credential" in str(e).lower():
            raise RemoteDenied(f"{url}: no usable S3 credentials ({_first_line(e)})") from None
        raise


class _PipeStream(io.RawIOBase):
    """stdout of ``sh -c COMMAND``; a non-zero exit at the end of the output is an error."""

    def __init__(self, command: str):
        self.command = command
        self.err = tempfile.TemporaryFile()  # unlinked already: nothing left behind
        self.proc = subprocess.Popen(command, shell=True, stdout=subprocess.PIPE, stderr=self.err,
                                     stdin=subprocess.DEVNULL)

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = self.proc.stdout.readinto(b)
        if n == 0 and self.proc.wait() != 0:
            self.err.seek(0)
            tail = self.err.read()[-300:].decode("utf-8", "replace").strip().splitlines()
            raise ConnectionError(f"exit status {self.proc.returncode}" + (f": {tail[-1]}" if tail else ""))
        return n

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.stdout.close()
        self.proc.wait()
        self.err.close()
        super().close()


def _pipe_open(command: str, offset: int):
    f = _PipeStream(command[len(PIPE):])
    if offset:
        _skip(f, offset)
    return f


def _skip(f, n: int) -> None:
    while n > 0:
        got = f.read(min(n, 1 << 20))
        if not got:
            raise ConnectionError("the stream ended before the position it was resumed at")
        n -= len(got)


def _opener(url: str) -> Callable[[int], object]:
    if url.startswith(PIPE):
        return lambda offset: _pipe_open(url, offset)
    if url.startswith("s3://"):
        return lambda offset: _s3_open(url, offset)
    return lambda offset: _http_open(url, offset)


def _first_line(e: BaseException) -> str:
    return (str(e).splitlines() or [type(e).__name__])[0][:300]


# the errors of a broken connection (http.client.IncompleteRead is an HTTPException)
def _transient(e: BaseException) -> bool:
    return (isinstance(e, (ConnectionError, TimeoutError, http.client.HTTPException, EOFError))
            or (isinstance(e, OSError) and not isinstance(e, (RemoteError, FileNotFoundError, PermissionError))))


class RetryingStream(io.RawIOBase):
    """A remote file read front to back; a broken read is reopened at the current
    byte with backoff (``tries`` times in a row), then :class:`RemoteError`."""

    def __init__(self, url: str, tries: int | None = None, backoff_s: float | None = None):
        self.url = url
        self.tries = RETRIES if tries is None else tries
        self.backoff_s = BACKOFF_S if backoff_s is None else backoff_s
        self.pos = 0
        self._open = _opener(url)
        self._f = self._retry(lambda: self._open(0))  # opened now: 404/403 surface at open

    def readable(self) -> bool:
        return True

    def _retry(self, action):
        for attempt in range(self.tries):
            try:
                return action()
            except Exception as e:  # noqa: BLE001 - classified right below
                if not _transient(e):
                    raise
                self._drop()
                if attempt + 1 == self.tries:
                    where = f" at byte {self.pos}" if self.pos else ""
                    raise RemoteError(f"{self.url}: failed {self.tries} times{where} ({type(e).__name__}: "
                                      f"{_first_line(e)})") from None
                time.sleep(self.backoff_s * 2 ** attempt)
        raise AssertionError("unreachable")

    def _drop(self) -> None:
        if getattr(self, "_f", None) is not None:
            try:
                self._f.close()
            except Exception:  # noqa: BLE001 - a broken connection may fail to close too
                pass
            self._f = None

    def readinto(self, b) -> int:
        def once() -> int:
            if self._f is None:
                self._f = self._open(self.pos)
            return self._f.readinto(b)

        n = self._retry(once)
        self.pos += n
        return n

    def close(self) -> None:
        self._drop()
        super().close()


def open_stream(url: str, buffer_size: int = 1 << 16) -> io.BufferedReader:
    """A buffered reader of the remote file ``url`` (see :class:`RetryingStream`)."""
    return io.BufferedReader(RetryingStream(url), buffer_size=buffer_size)


def read_bytes(url: str, limit: int = MAX_MANIFEST_BYTES) -> bytes:
    """The whole remote file (a manifest), at most ``limit`` bytes."""
    with open_stream(url) as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise RemoteError(f"{url}: larger than {limit} bytes")
    return data


def stream_sha256(url: str) -> tuple[int, str]:
    """(bytes, sha256) of the remote file, streamed."""
    h, n = hashlib.sha256(), 0
    with open_stream(url, 1 << 20) as f:
        while True:
            b = f.read(1 << 20)
            if not b:
                return n, h.hexdigest()
            h.update(b)
            n += len(b)
