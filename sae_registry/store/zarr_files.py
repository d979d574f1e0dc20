"""What activation stores and codes files share: where they may live, and their ``status`` life cycle.

Both are zarr v3 groups whose ``zarr.json`` attributes carry our format marker (``format``) and a
``status`` that is ``"writing"`` from the first byte on disk until the writer has put down the
last one, then ``"complete"``. Readers refuse anything else, so an interrupted writer's output is
never read as if it were whole; resuming writers accept only ``"writing"``.

A group is replaced (``overwrite``) only when it is one of ours: its marker is one of our formats
and it holds nothing but the arrays we write, so a mistyped ``--out`` never deletes someone's data.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import time
import urllib.parse
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import TypeVar

import zarr
import zarr.codecs
import zarr.storage

from ..errors import SAERegistryError

# Object stores a store may live on (fsspec protocols). Anything else that looks like a URL
# (http://, memory://, file://, chained "a::b" URLs ...) is refused before anything is fetched:
# a store path can come from a registry tag that anyone with write access set.
OBJECT_STORE_SCHEMES = ("s3", "gs", "gcs", "az", "abfs", "abfss")


def is_url(path: str | Path) -> bool:
    return "://" in str(path)


def location(path: str | Path) -> Path | str:
    """``path`` as a local absolute ``Path`` or an object-store URL; any other URL is an error."""
    if not is_url(path):
        return Path(path).absolute()
    url = str(path).rstrip("/")
    scheme = url.split("://", 1)[0].lower()
    if scheme not in OBJECT_STORE_SCHEMES:
        hint = " (give a plain path for a local folder)" if scheme == "file" else ""
        raise SAERegistryError(
            f"{url}: {scheme}:// is not a place sae-registry reads stores from{hint}; use a local path "
            f"or one of {', '.join(s + '://' for s in OBJECT_STORE_SCHEMES)}"
        )
    return url


# Where botocore finds credentials besides the environment's keys (files, profiles, roles).
_CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                       "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")
S3_CONNECT_SECONDS = 5  # an endpoint that does not answer fails in seconds, not after minutes of retries
S3_READ_SECONDS = 15  # a request whose answer stops coming for this long is retried
# How long a chunk read or write waits for an S3 endpoint that stopped answering (it went down, a network
# cut) before the work stops with an error that says how to resume; `SAE_REGISTRY_S3_WAIT_SECONDS`, read then.
S3_WAIT_SECONDS = 30
T = TypeVar("T")


def _endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def storage_options(url: str) -> dict:
    """fsspec options for ``url``: an S3-compatible endpoint from the environment (read now), short
    timeouts and few retries, so that an unreachable endpoint is an error in seconds."""
    if not url.startswith("s3://"):
        return {}
    options: dict = {"config_kwargs": {"connect_timeout": S3_CONNECT_SECONDS, "read_timeout": S3_READ_SECONDS,
                                       "retries": {"max_attempts": 3, "mode": "standard"}}}
    if endpoint := _endpoint():
        options["client_kwargs"] = {"endpoint_url": endpoint}
    return options


def check_s3(url: str) -> None:
    """Refuse, in seconds, an ``s3://`` URL with no credentials anywhere or an endpoint that does not answer."""
    if not url.startswith("s3://"):
        return
    s3_wait_seconds()  # a bad setting is refused before any work, not at the first outage
    home = Path(os.environ.get("HOME", "~")).expanduser()
    if not any(os.environ.get(name) for name in _CREDENTIAL_SOURCES) and not (home / ".aws" / "credentials").exists():
        raise SAERegistryError(
            f"{url}: no S3 credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), and "
            "AWS_ENDPOINT_URL for an S3-compatible server other than AWS"
        )
    endpoint = _endpoint()
    if endpoint:
        parts = urllib.parse.urlsplit(endpoint)
        port = parts.port or (443 if parts.scheme == "https" else 80)
        try:
            socket.create_connection((parts.hostname or "", port), timeout=S3_CONNECT_SECONDS).close()
        except OSError as e:
            raise SAERegistryError(
                f"{url}: cannot reach the S3 endpoint {endpoint} ({e}); start it, or point AWS_ENDPOINT_URL at one "
                "that runs"
            ) from None


def _lost_connection(e: BaseException) -> bool:
    """Whether ``e`` says the endpoint could not be reached or stopped answering (not that a key is missing)."""
    import aiohttp
    import botocore.exceptions

    kinds = (botocore.exceptions.ConnectionError, botocore.exceptions.HTTPClientError, aiohttp.ClientConnectionError,
             aiohttp.ClientPayloadError, ConnectionError, TimeoutError)
    while e is not None:
        if isinstance(e, kinds):
            return True
        e = e.__cause__ or e.__context__
    return False


def s3_wait_seconds() -> float:
    """How long a read or write waits for an S3 endpoint to answer again (``$SAE_REGISTRY_S3_WAIT_SECONDS``)."""
    value = os.environ.get("SAE_REGISTRY_S3_WAIT_SECONDS")
    try:
        seconds = float(value) if value else S3_WAIT_SECONDS
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise SAERegistryError(f"SAE_REGISTRY_S3_WAIT_SECONDS must be a number of seconds >= 0, got {value!r}")
    return seconds


def through_outages(where: Path | str, doing: str, then: str, action: Callable[[], T]) -> T:
    """``action()``; on an object store, an endpoint that stops answering is waited for (retried with
    backoff) for :func:`s3_wait_seconds`, then an error naming the store, what was being done
    (``doing``) and what to do (``then``). Local stores run ``action`` once."""
    if isinstance(where, Path):
        return action()
    wait = s3_wait_seconds()
    deadline, delay = time.monotonic() + wait, 0.25
    while True:
        try:
            return action()
        except Exception as e:
            if not _lost_connection(e):
                raise
            if time.monotonic() + delay > deadline:
                raise SAERegistryError(
                    f"{where}: the S3 endpoint {_endpoint() or '(AWS)'} stopped answering while {doing} and did not "
                    f"come back within {wait:g} s ({type(e).__name__}: {str(e).splitlines()[0][:200]}). {then}"
                ) from e
        time.sleep(delay)
        delay = min(2 * delay, 4.0)


def open_store(where: Path | str, *, read_only: bool) -> zarr.storage.StoreLike:
    """The zarr store at a local path or an object-store URL (checked reachable first)."""
    if isinstance(where, Path):
        return zarr.storage.LocalStore(where, read_only=read_only)
    check_s3(where)
    store = zarr.storage.FsspecStore.from_url(where, read_only=read_only, storage_options=storage_options(where))
    _few_retries(store.fs)
    return store


def _few_retries(fs) -> None:
    """s3fs tries a request that timed out or was cut 5 times over botocore's own 3 attempts (15 x 15 s on an
    endpoint that accepts and never answers); once is enough: :func:`through_outages` waits for outages."""
    if hasattr(fs, "retries"):
        fs.retries = 1


def exists(where: Path | str) -> bool:
    """Whether a zarr group (its ``zarr.json``) is at ``where``."""
    if isinstance(where, Path):
        return (where / "zarr.json").exists()
    store = open_store(where, read_only=True)
    return bool(zarr.core.sync.sync(store.exists("zarr.json")))


def delete_tree(where: Path | str) -> None:
    """Delete a folder or an object-store prefix and everything under it; nothing there is not an error."""
    if isinstance(where, Path):
        shutil.rmtree(where, ignore_errors=True)
        return
    zarr.core.sync.sync(open_store(where, read_only=False).delete_dir(""))


def _filesystem(url: str):
    """A synchronous fsspec filesystem for an object-store URL, with the same endpoint and timeouts as stores."""
    import fsspec

    check_s3(url)
    fs = fsspec.filesystem(url.split("://", 1)[0], **storage_options(url))
    _few_retries(fs)
    return fs


def groups_under(root: Path | str) -> list[tuple[Path | str, dict]]:
    """``root`` and each folder (or object-store prefix) directly under it that holds a zarr group, with the
    group's attributes; nothing there is an empty list."""
    if isinstance(root, Path):
        candidates: list[Path | str] = [root, *(sorted(root.iterdir()) if root.is_dir() else [])]
        read = lambda path: (path / "zarr.json").read_text()  # noqa: E731
    else:
        fs, scheme = _filesystem(root), root.split("://", 1)[0]
        try:
            children = sorted(fs.ls(root, detail=False, refresh=True))
        except FileNotFoundError:
            children = []
        candidates = [root, *(f"{scheme}://{c.rstrip('/')}" for c in children)]
        read = lambda path: fs.cat_file(f"{path}/zarr.json")  # noqa: E731
    found = []
    for path in candidates:
        try:
            attrs = json.loads(read(path)).get("attributes", {})
        except (OSError, ValueError, AttributeError):  # not a zarr group (FileNotFoundError is an OSError)
            continue
        found.append((path, attrs if isinstance(attrs, dict) else {}))
    return found


def group_attrs(where: Path | str) -> dict:
    """The attributes in the ``zarr.json`` at ``where`` (a folder or an object-store URL)."""
    if isinstance(where, Path):
        return json.loads((where / "zarr.json").read_text()).get("attributes", {})
    return json.loads(_filesystem(where).cat_file(f"{where}/zarr.json")).get("attributes", {})


def tree_bytes(where: Path | str) -> int:
    """Bytes of every file under a folder or an object-store prefix."""
    if isinstance(where, Path):
        return sum(f.stat().st_size for f in where.rglob("*") if f.is_file())
    return int(_filesystem(where).du(where))


def _url_attrs(where: str) -> dict:
    try:
        return dict(zarr.open_group(open_store(where, read_only=True), mode="r").attrs)
    except Exception:  # not a zarr group of ours: refused by the caller
        return {}


def codecs(name: str) -> list:
    """zarr compressors for one of our compressor names (``lz4``, ``zstd``, ``none``)."""
    if name == "lz4":
        return [zarr.codecs.BloscCodec(cname="lz4", clevel=5, shuffle="shuffle")]
    if name == "zstd":
        return [zarr.codecs.ZstdCodec(level=3)]
    return []


def create(path: Path | str, fmt: str, attrs: dict, *, overwrite: bool, arrays: Iterable[str]) -> zarr.Group:
    """A new group at ``path`` with ``attrs``, marked ``fmt`` and ``"writing"`` from its first write.

    An existing ``path`` needs ``overwrite`` and must be a group of format ``fmt`` holding only
    ``zarr.json`` and ``arrays`` (see :func:`replaceable`); then it is deleted first. ``path`` may be
    an object-store URL (see :func:`location`).
    """
    if isinstance(path, str):
        store = open_store(path, read_only=False)
        if exists(path):
            if not overwrite:
                raise SAERegistryError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
            if _url_attrs(path).get("format") != fmt:
                raise SAERegistryError(f"{path} exists and was not made by sae-registry as {fmt!r}; refusing to "
                                       "delete it with --overwrite. Choose another URL, or remove it yourself.")
            zarr.core.sync.sync(store.delete_dir(""))
        return zarr.create_group(store=store, zarr_format=3, attributes={**attrs, "format": fmt, "status": "writing"})
    if check_target(path, fmt, overwrite=overwrite, arrays=arrays):
        shutil.rmtree(path)
    # the marker goes in with the group's first write: no moment where our folder is unrecognisable
    return zarr.create_group(
        store=zarr.storage.LocalStore(path), zarr_format=3, attributes={**attrs, "format": fmt, "status": "writing"}
    )


def check_target(path: Path, fmt: str, *, overwrite: bool, arrays: Iterable[str]) -> bool:
    """Whether :func:`create` would replace ``path`` (refusing what it would refuse), touching nothing.

    Asked before expensive work (loading a model) as well as by ``create`` itself.
    """
    if not (path.exists() or path.is_symlink()):
        return False
    if not overwrite:
        raise SAERegistryError(f"{path} already exists; pass overwrite=True (--overwrite) to replace it")
    replaceable(path, fmt, arrays)
    return True


def replaceable(path: Path, fmt: str, arrays: Iterable[str]) -> None:
    """Refuse to delete ``path`` unless our own tools made it (a ``fmt`` group of our arrays only)."""
    why = None
    if path.is_symlink() or not path.is_dir():
        why = "it is not a folder" if not path.is_symlink() else "it is a symbolic link"
    else:
        try:
            marker = json.loads((path / "zarr.json").read_text()).get("attributes", {}).get("format")
        except (OSError, ValueError, AttributeError):
            marker = None
        extra = sorted(p.name for p in path.iterdir() if p.name not in {"zarr.json", *arrays})
        if marker != fmt:
            why = f"its zarr.json does not mark it as {fmt!r}"
        elif extra:
            why = f"it also holds {', '.join(extra[:5])}"
    if why:
        raise SAERegistryError(
            f"{path} exists and was not made by sae-registry as {fmt!r} ({why}); refusing to delete it "
            "with --overwrite. Choose another output path, or remove it yourself."
        )


def finish(group: zarr.Group, attrs: dict) -> None:
    """Write the final ``attrs`` and mark the group ``"complete"`` in one metadata write."""
    group.attrs.update({**attrs, "status": "complete"})


def require_finished(path: object, attrs: dict, fmt: str, *, what: str, stopped: str, fix: str) -> None:
    """Refuse a group of another format, or one whose writer stopped before marking it complete.

    ``what`` names the kind ("an sae-registry activation store"), ``stopped`` how its writer stops,
    ``fix`` what the user does about an unfinished one.
    """
    if attrs.get("format") != fmt:
        raise SAERegistryError(f"{path} is a zarr group but not {what}")
    if attrs.get("status") != "complete":
        raise SAERegistryError(f"{path} was never finished ({stopped}); it may be missing tokens. {fix}")


def require_unfinished(path: object, attrs: dict, fmt: str, what: str) -> None:
    """Refuse to resume anything but an unfinished group of format ``fmt``."""
    status = attrs.get("status")
    if attrs.get("format") != fmt or status != "writing":
        raise SAERegistryError(f"{path} is not an unfinished {what} (status {status!r}); nothing to resume")
