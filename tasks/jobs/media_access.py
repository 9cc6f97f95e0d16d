"""Where a media cell may point: a cell is input, not a code path.

A path in an image or audio column is read only when it lies under one of the media roots (by
default the input's own folder, or for a remote input its prefix), after resolving ``..`` and
symbolic links. A URL is read only when its scheme is allowed (by default: the input's own, under
the input's prefix). http(s) cells are off unless allowed, and even then never reach a loopback,
private, link-local, multicast or reserved address unless ``allow_private`` says so: every address
the host resolves to is checked, and the connection goes to the checked address (no second lookup a
DNS rebinding could answer differently), redirects included. A refused or unreadable cell is that
row's error (:class:`MediaRefused`), never the run's crash; no message echoes a file's bytes, and
URLs in messages are redacted (tasks/redact.py).
"""

from __future__ import annotations

import ipaddress
import os
import posixpath
import socket
import tempfile
import threading
from collections import OrderedDict
from dataclasses import dataclass
from io import BytesIO
from typing import IO
from urllib.parse import urljoin, urlsplit, urlunsplit

import fsspec

from tasks.redact import redact_text, redact_url

__all__ = [
    "HTTP_SCHEMES",
    "MAX_URL_BYTES",
    "MediaPolicy",
    "MediaRefused",
    "media_root_of",
    "missing_package",
    "scheme_of",
]

HTTP_SCHEMES = ("http", "https")
MAX_URL_BYTES = 1 << 30  # a media URL's body is cut off past 1 GiB (a two-hour MP3 is ~115 MB)
URL_TIMEOUT_S = 60.0
URL_CONNECT_TIMEOUT_S = 10.0
MAX_REDIRECTS = 5
SPOOL_BYTES = 8 << 20  # a fetched body past this many bytes waits in a temporary file, not in memory
GLOB_CHARS = "*?["
UNKNOWN = "an unknown scheme"
# fsspec's own error text says which package a protocol needs; these name it for the common ones.
PACKAGES = {
    "s3": "s3fs", "s3a": "s3fs", "gs": "gcsfs", "gcs": "gcsfs", "az": "adlfs", "abfs": "adlfs", "abfss": "adlfs",
    "adl": "adlfs", "hf": "huggingface_hub", "sftp": "paramiko", "ssh": "paramiko", "smb": "smbprotocol",
    "webdav": "webdav4", "oci": "ocifs", "oss": "ossfs", "hdfs": "pyarrow", "ftp": "(standard library)",
}  # fmt: skip


class MediaRefused(ValueError):
    """A media cell that is not read: outside the roots, a scheme not allowed or not installed, an
    address refused, a fetch that failed. The message names the cell (redacted) and what to do."""


def scheme_of(path: str) -> str:
    """``file`` for a local path (or ``file:`` URL), else the URL's scheme, lower case."""
    if "://" in path:
        return path.split("://", 1)[0].lower()
    return "file"


def _local(path: str) -> str:
    if path.startswith("file://"):
        return path[len("file://") :]
    if path.startswith("file:"):
        return path[len("file:") :]
    return path


def media_root_of(input_path: str) -> str:
    """The folder media paths of ``input_path`` may point into: the input file's folder, a folder
    input's own folder, or a glob's fixed leading folders (``rec/**/*.mp3`` → ``rec``)."""
    if any(c in input_path for c in GLOB_CHARS):
        fixed = input_path[: min(input_path.index(c) for c in GLOB_CHARS if c in input_path)]
        folder = fixed.rsplit("/", 1)[0] if "/" in fixed else "."
        return folder if "://" in folder else os.path.abspath(folder or "/")
    if "://" in input_path:
        return input_path.rstrip("/").rsplit("/", 1)[0]
    return os.path.dirname(os.path.abspath(_local(input_path)))


def missing_package(scheme: str) -> str | None:
    """None when fsspec can open ``scheme`` here; else what to install (for a message)."""
    try:
        fsspec.get_filesystem_class(scheme)
    except ImportError as exc:
        package = PACKAGES.get(scheme)
        return f"pip install {package}" if package else f"the package fsspec names: {exc}"
    except ValueError:
        return f"{UNKNOWN}: fsspec knows no {scheme}:// protocol"
    return None


def _normal_url(url: str) -> str:
    """A URL as its roots are compared: ``.`` and ``..`` resolved, query and fragment dropped; http(s)
    as scheme://host[:port]/path (host lower case); other schemes as fsspec names the path
    (``memory:///a/b`` and ``memory://a/b`` are one file), scheme://path."""
    scheme = scheme_of(url)
    if scheme in HTTP_SCHEMES:
        parts = urlsplit(url)
        path = posixpath.normpath("/" + parts.path.lstrip("/")) if parts.path else "/"
        return urlunsplit((scheme, parts.netloc.lower(), path, "", ""))
    rest = url.split("://", 1)[1].split("?", 1)[0].split("#", 1)[0]
    try:
        rest = fsspec.get_filesystem_class(scheme)._strip_protocol(url.split("?", 1)[0].split("#", 1)[0])
    except (ImportError, ValueError):
        pass
    return f"{scheme}://" + posixpath.normpath("/" + str(rest).lstrip("/")).lstrip("/")


def _under(path: str, root: str, sep: str) -> bool:
    root = root.rstrip(sep)
    return path == root or path.startswith(root + sep) or root == ""


@dataclass(frozen=True, kw_only=True)
class MediaPolicy:
    """Where media cells may point. ``roots``: local folders (resolved) and URL prefixes the cells
    may be under; None means anywhere except http(s) (a job built in code without an input's
    folder). ``schemes``: URL schemes allowed anywhere. ``allow_private``: http(s) may reach
    loopback, private and link-local addresses."""

    roots: tuple[str, ...] | None = None
    schemes: tuple[str, ...] = ()
    allow_private: bool = False
    max_url_bytes: int = MAX_URL_BYTES
    timeout_s: float = URL_TIMEOUT_S

    @classmethod
    def for_input(
        cls, input_path: str | None, *, roots: tuple[str, ...] = (), schemes: tuple[str, ...] = (), **kw
    ) -> MediaPolicy:
        """The input's own folder (or prefix) plus ``roots``; ``schemes`` allowed anywhere."""
        base = (media_root_of(input_path),) if input_path else ()
        return cls.under((*base, *roots), schemes=schemes, **kw)

    @classmethod
    def under(cls, roots: tuple[str, ...], *, schemes: tuple[str, ...] = (), **kw) -> MediaPolicy:
        resolved = []
        for root in roots:
            root = str(root).strip()
            if scheme_of(root) == "file":
                resolved.append(os.path.realpath(os.path.expanduser(_local(root))))
            else:
                resolved.append(_normal_url(root))
        shown = tuple(s.lower().strip().removesuffix("://") for s in schemes)
        return cls(roots=tuple(dict.fromkeys(resolved)), schemes=tuple(dict.fromkeys(shown)), **kw)

    def describe(self) -> dict[str, object]:
        """For the run metadata (URL roots redacted)."""
        return {
            "media_roots": None if self.roots is None else [redact_url(r) for r in self.roots],
            "media_schemes": list(self.schemes),
            "allow_private_urls": self.allow_private,
        }

    # -- checking -------------------------------------------------------------------------------
    def check(self, path: str, *, kind: str = "media", value: object = None) -> str:
        """The location to read for ``path`` (a local path resolved to its real path), or
        :class:`MediaRefused` saying why not and which option allows it."""
        scheme = scheme_of(path)
        shown = _shown(path, value)
        if scheme == "file":
            return self._check_local(_local(path), shown, kind)
        if scheme in HTTP_SCHEMES:
            if not self._url_allowed(path, scheme):
                raise MediaRefused(
                    f"{kind} {shown}: {scheme} URLs in a media column are not fetched unless allowed; pass "
                    f"--allow-media-scheme {scheme} (or --media-root {scheme}://HOST/PREFIX/ to allow one site)"
                    + ("" if self.allow_private else "; addresses on your own network also need --allow-private-urls")
                )
            return path
        missing = missing_package(scheme)
        if missing is not None and missing.startswith(UNKNOWN):
            raise MediaRefused(
                f"{kind} {shown}: {scheme}:// is not a scheme gembatch can read (fsspec knows no such protocol)"
            )
        if not self._url_allowed(path, scheme):
            needs = f" (reading them needs {missing})" if missing else ""
            raise MediaRefused(
                f"{kind} {shown}: {scheme}:// URLs are not read from this input's media column unless allowed; "
                f"pass --allow-media-scheme {scheme} or --media-root {scheme}://BUCKET/PREFIX{needs}"
            )
        if missing:
            raise MediaRefused(
                f"{kind} {shown}: reading {scheme}:// URLs needs a package not installed here: {missing}"
            )
        return path

    def _check_local(self, path: str, shown: str, kind: str) -> str:
        real = os.path.realpath(path)
        if self.roots is None or "file" in self.schemes:
            return real
        local_roots = [r for r in self.roots if scheme_of(r) == "file"]
        if any(_under(real, root, os.sep) for root in local_roots):
            return real
        where = " or ".join(local_roots) if local_roots else "no local folder (this input is remote)"
        via = "" if os.path.normpath(path) == real else f" (it resolves to {real} through a symbolic link)"
        raise MediaRefused(
            f"{kind} {shown} is outside the folder media paths are read from ({where}){via}: "
            "paths in a media column stay under the input's folder; pass --media-root FOLDER to allow another"
        )

    def _url_allowed(self, url: str, scheme: str) -> bool:
        if scheme in self.schemes:
            return True
        if self.roots is None:
            return scheme not in HTTP_SCHEMES
        normal = _normal_url(url)
        return any(scheme_of(r) == scheme and _under(normal, r, "/") for r in self.roots)

    # -- reading --------------------------------------------------------------------------------
    def open(self, path: str) -> IO[bytes]:
        """A readable binary file for a location :meth:`check` returned (http(s): fetched here)."""
        if scheme_of(path) in HTTP_SCHEMES:
            return _fetch_cached(path, self)
        if scheme_of(path) == "file" and self.roots is not None:
            # Checked again as it is opened: a file swapped for a link since the row was planned.
            path = self._check_local(_local(path), redact_url(path), "media")
        fs, fs_path = fsspec.core.url_to_fs(path)
        if fs.isdir(fs_path):
            raise IsADirectoryError(f"{path} is a folder")
        return fs.open(fs_path, "rb")


def _shown(path: str, value: object) -> str:
    shown = redact_url(path)
    if value is not None and str(value).strip() != path:
        shown += f" (from {redact_url(str(value).strip())!r})"
    return shown


# -- http(s) --------------------------------------------------------------------------------------
def _refused_address(ip: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str | None:
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:
        ip = mapped
    if ip.is_loopback:
        return "a loopback address"
    if ip.is_link_local:
        return "a link-local address (cloud metadata endpoints live there)"
    if ip.is_multicast:
        return "a multicast address"
    if ip.is_private:
        return "a private address"
    if ip.is_unspecified or ip.is_reserved or not ip.is_global:
        return "a reserved, non-public address"
    return None


def _addresses(host: str, port: int, policy: MediaPolicy, shown: str) -> list[str]:
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError) as exc:
        raise MediaRefused(f"{shown}: the host {host!r} can't be resolved ({exc})") from None
    addresses = list(dict.fromkeys(info[4][0] for info in infos))
    if not policy.allow_private:
        for address in addresses:
            why = _refused_address(ipaddress.ip_address(address.split("%", 1)[0]))
            if why is not None:
                raise MediaRefused(
                    f"{shown}: {host} resolves to {address}, {why}; media URLs do not reach those unless "
                    "--allow-private-urls is given"
                )
    if not addresses:
        raise MediaRefused(f"{shown}: the host {host!r} resolves to no address")
    return addresses


# A row's file is opened several times (size, header, probe, hash, then the send): small bodies are
# kept for the next open instead of being fetched again.
CACHE_BYTES = 256 << 20
CACHE_ITEM_BYTES = 32 << 20
_cache: OrderedDict[tuple[str, MediaPolicy], bytes] = OrderedDict()
_cache_lock = threading.Lock()


def _fetch_cached(url: str, policy: MediaPolicy) -> IO[bytes]:
    key = (url, policy)
    with _cache_lock:
        body = _cache.get(key)
        if body is not None:
            _cache.move_to_end(key)
            return BytesIO(body)
    fetched = fetch_url(url, policy)
    size = fetched.seek(0, os.SEEK_END)
    fetched.seek(0)
    if size > CACHE_ITEM_BYTES:
        return fetched
    with fetched:
        body = fetched.read()
    with _cache_lock:
        _cache[key] = body
        while sum(len(b) for b in _cache.values()) > CACHE_BYTES:
            _cache.popitem(last=False)
    return BytesIO(body)


def fetch_url(url: str, policy: MediaPolicy) -> IO[bytes]:
    """The body of an http(s) URL in a (spooled) temporary file, positioned at its start.

    The host is resolved here and every address checked; the request goes to the first address,
    with the host name in the ``Host`` header and for TLS (SNI and certificate check). Redirects are
    followed by hand, each target checked again like a cell. Raises :class:`MediaRefused`."""
    import httpx2

    timeout = httpx2.Timeout(policy.timeout_s, connect=URL_CONNECT_TIMEOUT_S)
    current = url
    with httpx2.Client(timeout=timeout, follow_redirects=False, trust_env=False) as client:
        for _ in range(MAX_REDIRECTS + 1):
            shown = redact_url(current)
            parts = urlsplit(current)
            host = parts.hostname
            if not host:
                raise MediaRefused(f"{shown}: the URL names no host")
            try:
                port = parts.port or (443 if parts.scheme == "https" else 80)
            except ValueError:
                raise MediaRefused(f"{shown}: the URL's port is not a number") from None
            address = _addresses(host, port, policy, shown)[0]
            pinned = f"[{address}]" if ":" in address else address
            target = urlunsplit((parts.scheme, f"{pinned}:{port}", parts.path or "/", parts.query, ""))
            headers = {"Host": host if parts.port is None else f"{host}:{parts.port}"}
            auth = (parts.username or "", parts.password or "") if parts.username else None
            extensions = {"sni_hostname": host} if parts.scheme == "https" else {}
            try:
                with client.stream("GET", target, headers=headers, auth=auth, extensions=extensions) as response:
                    if response.is_redirect and "location" in response.headers:
                        following = urljoin(current, response.headers["location"])
                        if scheme_of(following) not in HTTP_SCHEMES:
                            raise MediaRefused(f"{shown} redirects to a {scheme_of(following)} URL: not followed")
                        policy.check(following, kind="redirect from " + shown)
                        current = following
                        continue
                    if response.status_code != 200:
                        raise MediaRefused(f"{shown} answered HTTP {response.status_code}: check the URL")
                    return _body(response, policy, shown)
            except httpx2.HTTPError as exc:
                raise MediaRefused(
                    f"{shown} can't be fetched ({type(exc).__name__}: {redact_text(str(exc))})"
                ) from None
    raise MediaRefused(f"{redact_url(url)}: more than {MAX_REDIRECTS} redirects")


def _body(response, policy: MediaPolicy, shown: str) -> IO[bytes]:
    declared = response.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > policy.max_url_bytes:
        raise MediaRefused(
            f"{shown} is {int(declared)} bytes, over the {policy.max_url_bytes}-byte limit for a media URL"
        )
    out = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)
    received = 0
    for block in response.iter_bytes():
        received += len(block)
        if received > policy.max_url_bytes:
            out.close()
            raise MediaRefused(f"{shown} is over the {policy.max_url_bytes}-byte limit for a media URL")
        out.write(block)
    out.seek(0)
    return out
