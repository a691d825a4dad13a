"""Object storage: one URL for the whole suite, ``file:///abs/folder`` or ``s3://bucket/prefix``.

Objects are addressed by relative keys in the layout of DESIGN.md §5 (``datasets/<id>/v<n>/data.parquet``,
``results/<job_id>/result.parquet``)::

    storage = Storage.from_url(settings.storage_url or default_storage_url(settings.data_dir))
    async with storage.writer("results/j1/result.parquet") as out:
        async for chunk in body:
            await out.write(chunk)
    # the object is visible now, whole; had the block raised (or been cancelled), nothing would be left
    async for chunk in storage.read_chunks("results/j1/result.parquet"):
        ...
    await storage.close()

Nothing here blocks the event loop: local files are read and written in worker threads, S3 is reached through
s3fs's async API (aiobotocore). DuckDB reads what :meth:`Storage.engine_path` names, after
:meth:`Storage.register_with_duckdb` (DuckDB 2.0 has no httpfs here: it reads ``s3://`` through a registered,
synchronous fsspec filesystem).

Prefixes (``list``, ``delete_prefix``) are folders: ``"datasets/1"`` means everything under ``datasets/1/`` and never
``datasets/10/...``.
"""

from __future__ import annotations

import asyncio
import builtins
import contextlib
import errno
import logging
import os
import shutil
import uuid
from abc import ABC, abstractmethod
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Protocol, TypeVar
from urllib.parse import quote, unquote, urlsplit

from .errors import Conflict

if TYPE_CHECKING:
    import duckdb
    from fsspec import AbstractFileSystem
    from s3fs import S3FileSystem

__all__ = [
    "DEFAULT_CHUNK_SIZE",
    "DEFAULT_PART_SIZE",
    "FileStorage",
    "ObjectWriter",
    "PresignedUrlsUnsupported",
    "S3Storage",
    "Storage",
    "default_storage_url",
    "validate_key",
]

log = logging.getLogger(__name__)

T = TypeVar("T")
Chunk = bytes | bytearray | memoryview

DEFAULT_CHUNK_SIZE = 1 << 20
#: S3 multipart part size (S3 wants at least 5 MiB for every part but the last). It doubles every 1000 parts (after
#: ~7.8 GiB, ~23 GiB, ...), so S3's 10,000-part limit is never what stops an upload: 10,000 such parts hold ~7.8 TiB,
#: more than S3's 5 TiB per object.
DEFAULT_PART_SIZE = 8 << 20
MIN_PART_SIZE = 5 << 20
#: Part uploads of one writer in flight at once (memory: about part_size * (concurrency + 1) per writer).
DEFAULT_UPLOAD_CONCURRENCY = 4
#: SigV4 presigned URLs live at most 7 days.
MAX_PRESIGN_EXPIRY_S = 7 * 24 * 3600
_S3_MAX_PARTS = 10_000
_S3_MAX_KEY_BYTES = 1024
#: Local writes go to a hidden file next to the target, then ``os.replace``; listings never show these.
_TMP_PREFIX = ".strata-tmp-"


class PresignedUrlsUnsupported(Conflict):
    code = "PRESIGNED_UNSUPPORTED"
    default_message = "Presigned URLs need S3 object storage; this deployment stores objects in a local folder."


class ObjectWriter(Protocol):
    """What :meth:`Storage.writer` yields. Await each ``write`` before the next; the chunk may be reused after."""

    @property
    def bytes_written(self) -> int: ...

    async def write(self, chunk: Chunk, /) -> None: ...


def default_storage_url(data_dir: Path) -> str:
    """The default storage URL: the ``storage`` folder under the data folder."""
    return (Path(data_dir).expanduser().absolute() / "storage").as_uri()


# --------------------------------------------------------------------------------------------------------- keys


def validate_key(key: str) -> str:
    """Return ``key`` if it is a safe relative object key, else raise ``ValueError``.

    Keys are built from ids by our own code, so a bad one is a bug; this makes sure it can never reach outside the
    storage root (no absolute paths, ``..``, backslashes, NUL or other control characters, empty segments).
    """
    if not isinstance(key, str) or not key:
        raise ValueError(f"object key must be a non-empty string, got {key!r}")
    if key.startswith("/"):
        raise ValueError(f"object key must be relative: {key!r}")
    if "\\" in key:
        raise ValueError(f"object key must not contain a backslash: {key!r}")
    if any(ord(c) < 0x20 or ord(c) == 0x7F for c in key):
        raise ValueError(f"object key must not contain NUL or control characters: {key!r}")
    for segment in key.split("/"):
        if segment in ("", ".", ".."):
            raise ValueError(f"object key has an empty, '.' or '..' segment: {key!r}")
        if segment.startswith(_TMP_PREFIX):
            raise ValueError(f"object key segments must not start with {_TMP_PREFIX!r}: {key!r}")
    return key


def _validate_prefix(prefix: str, *, allow_root: bool) -> str:
    """A folder prefix without its trailing slash; ``""`` is the root (only where ``allow_root``)."""
    stripped = prefix[:-1] if prefix.endswith("/") else prefix
    if not stripped:
        if allow_root:
            return ""
        raise ValueError("refusing an empty prefix here: it would mean the whole storage")
    return validate_key(stripped)


def _nbytes(chunk: Chunk) -> int:
    return chunk.nbytes if isinstance(chunk, memoryview) else len(chunk)


# ------------------------------------------------------------------------------------------ cancellation helpers


async def _shielded(aw: Awaitable[T], *, discard: Callable[[T], object] | None = None) -> T:
    """Run ``aw`` to its end even if the caller is cancelled meanwhile, then let the cancellation through.

    Used for work that must not be cut in half: a write or read running in a worker thread (cancelling the await
    does not stop the thread, and closing its file under it would be a race) and the final commit. ``discard``
    receives a result that arrives for a caller that was cancelled (an opened file, to close it).
    """
    task = asyncio.ensure_future(aw)
    cancelled = False
    while not task.done():
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            cancelled = True
    if cancelled:
        if not task.cancelled() and task.exception() is None and discard is not None:
            discard(task.result())
        raise asyncio.CancelledError
    return task.result()


async def _cleanup(aw: Awaitable[None], what: str) -> None:
    """Run cleanup after a failure: to the end even when cancelled, and never masking the original error."""
    try:
        await _shielded(aw)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.warning("storage cleanup failed: %s", what, exc_info=True)


# ------------------------------------------------------------------------------------------------------ the API


class Storage(ABC):
    """Object storage behind one URL. Build it with :meth:`from_url`; ``await close()`` it (or ``async with``)."""

    #: The storage URL (without credentials).
    url: str

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        s3_endpoint_url: str | None = None,
        s3_region: str | None = None,
        s3_key: str | None = None,
        s3_secret: str | None = None,
    ) -> Storage:
        """``file:///abs/folder`` or ``s3://bucket[/prefix]``.

        S3 credentials come from ``s3_key``/``s3_secret`` or, when those are not given, from the standard AWS chain
        (environment, shared config, instance role). Credentials in the URL are refused: URLs end up in logs.
        """
        parts = urlsplit(url)
        if parts.query or parts.fragment:
            raise ValueError(f"storage URL must not have a query or fragment: {url!r}")
        if parts.scheme == "file":
            if parts.netloc not in ("", "localhost"):
                raise ValueError(f"file storage URL must be file:///absolute/path, got {url!r}")
            path = unquote(parts.path)
            if not path.startswith("/"):
                raise ValueError(f"file storage URL must name an absolute folder: {url!r}")
            return FileStorage(Path(os.path.normpath(path)))
        if parts.scheme in ("s3", "s3a"):
            if "@" in parts.netloc:
                raise ValueError("credentials do not belong in the storage URL; use the S3 key/secret settings")
            bucket = parts.netloc
            if not bucket or ":" in bucket:
                raise ValueError(f"S3 storage URL must be s3://bucket[/prefix], got {url!r}")
            prefix = unquote(parts.path).strip("/")
            if prefix:
                validate_key(prefix)
            if (s3_key is None) != (s3_secret is None):
                raise ValueError("give both s3_key and s3_secret, or neither (to use the AWS credential chain)")
            return S3Storage(
                bucket,
                prefix,
                endpoint_url=s3_endpoint_url or None,
                region=s3_region or None,
                key=s3_key,
                secret=s3_secret,
            )
        raise ValueError(f"storage URL must start with file:// or s3://, got {url!r}")

    async def __aenter__(self) -> Storage:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    @abstractmethod
    async def close(self) -> None:
        """Release connections (S3). The storage must not be used afterwards."""

    # writing and reading

    @abstractmethod
    def writer(self, key: str) -> AbstractAsyncContextManager[ObjectWriter]:
        """Write an object in chunks. It appears whole when the block ends normally (replacing any object of that
        key), and not at all when the block raises or is cancelled."""

    @abstractmethod
    def read_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncGenerator[bytes, None]:
        """The object's bytes in chunks of ``chunk_size`` (the last one shorter).

        An async generator: a missing object raises ``FileNotFoundError`` at the first iteration (check
        :meth:`size` first where the status must be decided before streaming), and a consumer that stops early
        should close it (``contextlib.aclosing``) so the file or connection is released at once.
        """

    async def put_file(self, path: Path, key: str, *, chunk_size: int = 8 * 1024 * 1024) -> int:
        """Store the local file ``path`` as ``key`` (whole or not at all) and return its size. ``path`` is consumed:
        file storage may move it instead of copying it."""
        file = await asyncio.to_thread(path.open, "rb")
        try:
            async with self.writer(key) as writer:
                while chunk := await asyncio.to_thread(file.read, chunk_size):
                    await writer.write(chunk)
                return writer.bytes_written
        finally:
            await asyncio.to_thread(file.close)

    @abstractmethod
    async def size(self, key: str) -> int:
        """The object's size in bytes; ``FileNotFoundError`` if there is none."""

    @abstractmethod
    async def exists(self, key: str) -> bool: ...

    @abstractmethod
    async def delete(self, key: str) -> None:
        """Delete one object; deleting a missing object is not an error."""

    @abstractmethod
    async def delete_prefix(self, prefix: str) -> None:
        """Delete every object under the folder ``prefix`` (recursively). The root itself is refused."""

    @abstractmethod
    async def list(self, prefix: str = "") -> builtins.list[str]:
        """The keys under the folder ``prefix`` (recursively; ``""`` for all), sorted."""

    # handing objects to engines and clients

    @abstractmethod
    def local_path(self, key: str) -> Path | None:
        """The object's path on this machine (file storage), or ``None`` (S3)."""

    @abstractmethod
    def engine_path(self, key: str) -> str:
        """What DuckDB should read: an absolute local path, or ``s3://bucket/prefix/key`` (after
        :meth:`register_with_duckdb`)."""

    @abstractmethod
    def display_url(self, key: str) -> str:
        """The object's URL, percent-encoded and never with credentials (for manifests and logs); engines and
        SDKs want :meth:`engine_path` instead."""

    @abstractmethod
    def fsspec_filesystem(self) -> AbstractFileSystem:
        """A synchronous fsspec filesystem over this storage's objects (paths as :meth:`engine_path` gives them)."""

    @abstractmethod
    def register_with_duckdb(self, con: duckdb.DuckDBPyConnection) -> None:
        """Make ``con`` able to read :meth:`engine_path` (registers the S3 filesystem; nothing for local files)."""

    @abstractmethod
    async def presigned_put_url(self, key: str, expires_s: int) -> str:
        """A URL a client can ``PUT`` the object's bytes to directly. :class:`PresignedUrlsUnsupported` without S3."""

    @abstractmethod
    async def presigned_get_url(self, key: str, expires_s: int) -> str:
        """A URL a client can ``GET`` the object from directly. :class:`PresignedUrlsUnsupported` without S3."""


# ---------------------------------------------------------------------------------------------- local folder


class _FileWriter:
    def __init__(self, file: IO[bytes]) -> None:
        self._file = file
        self.bytes_written = 0

    async def write(self, chunk: Chunk, /) -> None:
        n = _nbytes(chunk)
        if n:
            await _shielded(asyncio.to_thread(self._file.write, chunk))
            self.bytes_written += n


def _open_temp(target: Path) -> tuple[Path, IO[bytes]]:
    target.parent.mkdir(parents=True, exist_ok=True)
    # not derived from the target's name, which may already be as long as a name can be
    temp = target.with_name(f"{_TMP_PREFIX}{uuid.uuid4().hex}")
    # 0o666 & ~umask, like any new file (mkstemp would make it 0o600)
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)
    return temp, os.fdopen(fd, "wb")


def _commit_temp(file: IO[bytes], temp: Path, target: Path) -> None:
    try:
        file.flush()
        os.fsync(file.fileno())
    finally:
        file.close()
    os.replace(temp, target)
    # make the rename itself durable
    dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _move_into(source: Path, target: Path) -> int:
    """Move ``source`` to ``target`` durably: its data, then the rename (``EXDEV`` across file systems)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(source, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
    try:
        os.fsync(fd)
        size = os.fstat(fd).st_size
    finally:
        os.close(fd)
    os.replace(source, target)
    dir_fd = os.open(target.parent, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    return size


def _discard_temp(file: IO[bytes], temp: Path) -> None:
    try:
        file.close()
    finally:
        temp.unlink(missing_ok=True)


def _open_read(path: Path) -> IO[bytes]:
    if path.is_dir():
        raise FileNotFoundError(f"no object at {path}")
    return path.open("rb")


def _close_file(file: IO[bytes]) -> None:
    file.close()


def _list_files(base: Path, root: Path) -> builtins.list[str]:
    found: builtins.list[str] = []
    for folder, _dirs, files in os.walk(base):
        for name in files:
            if not name.startswith(_TMP_PREFIX):
                found.append(Path(folder, name).relative_to(root).as_posix())
    return sorted(found)


def _is_file(path: Path) -> bool:
    return path.is_file()


def _file_size(path: Path) -> int:
    st = path.stat()
    if not path.is_file():
        raise FileNotFoundError(f"no object at {path}")
    return st.st_size


def _remove_tree(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError, NotADirectoryError):
        shutil.rmtree(path)


class FileStorage(Storage):
    """Objects as files under a local folder (created on the first write)."""

    def __init__(self, root: Path) -> None:
        if not root.is_absolute():
            raise ValueError(f"file storage root must be absolute: {root}")
        self.root = root
        self.url = root.as_uri()

    def __repr__(self) -> str:
        return f"FileStorage({self.url!r})"

    def _path(self, key: str) -> Path:
        return self.root / validate_key(key)

    async def close(self) -> None:
        """Nothing to release."""

    @asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[ObjectWriter]:
        target = self._path(key)
        temp, file = await _shielded(asyncio.to_thread(_open_temp, target), discard=lambda r: _discard_temp(r[1], r[0]))
        out = _FileWriter(file)
        try:
            yield out
            await _shielded(asyncio.to_thread(_commit_temp, file, temp, target))
        except BaseException:
            await _cleanup(asyncio.to_thread(_discard_temp, file, temp), f"removing {temp}")
            raise

    async def put_file(self, path: Path, key: str, *, chunk_size: int = 8 * 1024 * 1024) -> int:
        """A rename when ``path`` is on the storage's file system (no copy), a copy otherwise."""
        target = self._path(key)
        try:
            return await _shielded(asyncio.to_thread(_move_into, path, target))
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
        return await super().put_file(path, key, chunk_size=chunk_size)

    async def read_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncGenerator[bytes, None]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        path = self._path(key)
        file: IO[bytes] = await _shielded(asyncio.to_thread(_open_read, path), discard=_close_file)
        try:
            while chunk := await _shielded(asyncio.to_thread(file.read, chunk_size)):
                yield chunk
        finally:
            file.close()

    async def size(self, key: str) -> int:
        return await asyncio.to_thread(_file_size, self._path(key))

    async def exists(self, key: str) -> bool:
        return await asyncio.to_thread(_is_file, self._path(key))

    async def delete(self, key: str) -> None:
        await asyncio.to_thread(self._path(key).unlink, missing_ok=True)

    async def delete_prefix(self, prefix: str) -> None:
        folder = self.root / _validate_prefix(prefix, allow_root=False)
        await asyncio.to_thread(_remove_tree, folder)

    async def list(self, prefix: str = "") -> builtins.list[str]:
        folder = self.root / _validate_prefix(prefix, allow_root=True)
        return await asyncio.to_thread(_list_files, folder, self.root)

    def local_path(self, key: str) -> Path:
        return self._path(key)

    def engine_path(self, key: str) -> str:
        return str(self._path(key))

    def display_url(self, key: str) -> str:
        return self._path(key).as_uri()

    def fsspec_filesystem(self) -> AbstractFileSystem:
        from fsspec.implementations.local import LocalFileSystem

        return LocalFileSystem()

    def register_with_duckdb(self, con: duckdb.DuckDBPyConnection) -> None:
        """Nothing to do: DuckDB reads local paths itself."""

    async def presigned_put_url(self, key: str, expires_s: int) -> str:
        validate_key(key)
        raise PresignedUrlsUnsupported

    async def presigned_get_url(self, key: str, expires_s: int) -> str:
        validate_key(key)
        raise PresignedUrlsUnsupported


# ------------------------------------------------------------------------------------------------------- S3


class _S3Writer:
    """Buffers chunks into parts and uploads them (a few at once) into one multipart upload.

    The upload is created with the first full part; an object smaller than one part is a single ``PutObject`` at
    the end. Either way nothing is visible until :meth:`commit`; :meth:`abort` cancels the part uploads and aborts
    the multipart upload so no parts are left to pay for.
    """

    def __init__(self, fs: S3FileSystem, bucket: str, key: str, *, part_size: int, concurrency: int) -> None:
        self._fs, self._bucket, self._key = fs, bucket, key
        self._base_part_size = part_size
        self._concurrency = concurrency
        self._pending: builtins.list[bytes] = []
        self._pending_bytes = 0
        self._upload_id: str | None = None
        self._checksum_field: str | None = None
        self._next_part = 1
        self._parts: dict[int, dict[str, Any]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.bytes_written = 0

    def _part_size(self) -> int:
        return self._base_part_size << ((self._next_part - 1) // 1000)

    async def write(self, chunk: Chunk, /) -> None:
        n = _nbytes(chunk)
        if not n:
            return
        # keep our own copy: the caller may reuse a bytearray or memoryview
        self._pending.append(chunk if isinstance(chunk, bytes) else bytes(chunk))
        self._pending_bytes += n
        self.bytes_written += n
        while self._pending_bytes >= (size := self._part_size()):
            data = b"".join(self._pending)
            rest = data[size:]
            self._pending = [rest] if rest else []
            self._pending_bytes = len(rest)
            await self._start_part(data[:size])

    async def _start_part(self, data: bytes) -> None:
        if self._upload_id is None:
            mpu = await self._fs._call_s3("create_multipart_upload", Bucket=self._bucket, Key=self._key)
            self._upload_id = str(mpu["UploadId"])
            # if the store made it a checksummed upload, completing it must repeat each part's checksum
            algorithm = mpu.get("ChecksumAlgorithm")
            self._checksum_field = f"Checksum{algorithm}" if algorithm else None
        while len(self._tasks) >= self._concurrency:
            done, _ = await asyncio.wait(self._tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                self._tasks.discard(task)
                task.result()
        if self._next_part > _S3_MAX_PARTS:
            raise OSError(f"object too large for one S3 multipart upload: {self._key}")
        number = self._next_part
        self._next_part += 1
        self._tasks.add(asyncio.create_task(self._upload_part(number, data, self._upload_id)))

    async def _upload_part(self, number: int, data: bytes, upload_id: str) -> None:
        out = await self._fs._call_s3(
            "upload_part", Bucket=self._bucket, Key=self._key, UploadId=upload_id, PartNumber=number, Body=data
        )
        part: dict[str, Any] = {"PartNumber": number, "ETag": out["ETag"]}
        if self._checksum_field and self._checksum_field in out:
            part[self._checksum_field] = out[self._checksum_field]
        self._parts[number] = part

    async def flush(self) -> None:
        """Upload what is left (the last part); not needed for a single ``PutObject``."""
        if self._upload_id is None:
            return
        if self._pending_bytes:
            data = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            await self._start_part(data)
        # every outcome collected (no "exception never retrieved"); cancelled here, abort() still finds the tasks
        outcomes = await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome

    async def commit(self) -> None:
        if self._upload_id is None:
            data = b"".join(self._pending)
            self._pending, self._pending_bytes = [], 0
            await self._fs._call_s3("put_object", Bucket=self._bucket, Key=self._key, Body=data)
            return
        parts = [self._parts[n] for n in sorted(self._parts)]
        await self._fs._call_s3(
            "complete_multipart_upload",
            Bucket=self._bucket,
            Key=self._key,
            UploadId=self._upload_id,
            MultipartUpload={"Parts": parts},
        )
        self._upload_id = None

    async def abort(self) -> None:
        self._pending, self._pending_bytes = [], 0
        for task in self._tasks:
            task.cancel()
        # wait for them first: S3 may keep a part that arrives after the abort (its docs say to abort again then)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks.clear()
        if self._upload_id is not None:
            upload_id, self._upload_id = self._upload_id, None
            await self._fs._call_s3("abort_multipart_upload", Bucket=self._bucket, Key=self._key, UploadId=upload_id)


class S3Storage(Storage):
    """Objects in an S3 bucket under a key prefix, through s3fs (aiobotocore); boto3 for presigned URLs."""

    def __init__(
        self,
        bucket: str,
        prefix: str = "",
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        key: str | None = None,
        secret: str | None = None,
        part_size: int = DEFAULT_PART_SIZE,
        upload_concurrency: int = DEFAULT_UPLOAD_CONCURRENCY,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"S3 parts must be at least {MIN_PART_SIZE} bytes")
        if upload_concurrency < 1:
            raise ValueError("upload_concurrency must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.endpoint_url = endpoint_url
        self.region = region
        self.part_size = part_size
        self.upload_concurrency = upload_concurrency
        self._key, self._secret = key, secret
        self.url = f"s3://{bucket}/{self.prefix}" if self.prefix else f"s3://{bucket}"
        self._fs: S3FileSystem = self._make_fs(asynchronous=True)
        self._client: Any = None  # the aiobotocore client behind self._fs, once connected
        self._sync_fs: S3FileSystem | None = None
        self._boto3_client: Any = None
        self._boto3_lock = asyncio.Lock()

    def __repr__(self) -> str:
        endpoint = f", endpoint_url={self.endpoint_url!r}" if self.endpoint_url else ""
        return f"S3Storage({self.url!r}{endpoint})"

    def _client_options(self) -> tuple[dict[str, Any], dict[str, Any]]:
        client_kwargs: dict[str, Any] = {}
        if self.region:
            client_kwargs["region_name"] = self.region
        # S3-compatible stores (MinIO, moto, Ceph) are addressed by path; AWS itself picks virtual hosts
        config_kwargs: dict[str, Any] = {"s3": {"addressing_style": "path"}} if self.endpoint_url else {}
        return client_kwargs, config_kwargs

    def _make_fs(self, *, asynchronous: bool) -> S3FileSystem:
        from s3fs import S3FileSystem

        client_kwargs, config_kwargs = self._client_options()
        return S3FileSystem(
            endpoint_url=self.endpoint_url,
            key=self._key,
            secret=self._secret,
            client_kwargs=client_kwargs,
            config_kwargs=config_kwargs,
            asynchronous=asynchronous,
            # fsspec caches instances by arguments: one bound to another event loop would be handed back
            skip_instance_cache=True,
            # and listings: a cached listing hides objects other processes wrote, and gives DuckDB stale sizes
            use_listings_cache=False,
        )

    def _full_key(self, key: str) -> str:
        validate_key(key)
        full = f"{self.prefix}/{key}" if self.prefix else key
        if len(full.encode()) > _S3_MAX_KEY_BYTES:
            raise ValueError(f"S3 keys are at most {_S3_MAX_KEY_BYTES} bytes: {full!r}")
        return full

    def _full_prefix(self, prefix: str, *, allow_root: bool) -> str:
        folder = _validate_prefix(prefix, allow_root=allow_root)
        parts = [p for p in (self.prefix, folder) if p]
        return "/".join(parts) + "/" if parts else ""

    async def _connect(self) -> None:
        # cheap once connected; keeps hold of the client s3fs uses now (it makes a new one if the old one's HTTP
        # session was closed), so that close() closes that one
        self._client = await self._fs.set_session()

    async def _call(self, method: str, **kwargs: Any) -> dict[str, Any]:
        await self._connect()
        result: dict[str, Any] = await self._fs._call_s3(method, **kwargs)
        return result

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await client.close()
        sync_fs, self._sync_fs = self._sync_fs, None
        if sync_fs is not None:
            await asyncio.to_thread(_close_sync_fs, sync_fs)

    # writing and reading

    @asynccontextmanager
    async def writer(self, key: str) -> AsyncIterator[ObjectWriter]:
        full = self._full_key(key)
        await self._connect()
        out = _S3Writer(self._fs, self.bucket, full, part_size=self.part_size, concurrency=self.upload_concurrency)
        try:
            yield out
            await out.flush()
            await _shielded(out.commit())
        except BaseException:
            await _cleanup(out.abort(), f"aborting the multipart upload of s3://{self.bucket}/{full}")
            raise

    async def read_chunks(self, key: str, chunk_size: int = DEFAULT_CHUNK_SIZE) -> AsyncGenerator[bytes, None]:
        if chunk_size <= 0:
            raise ValueError("chunk_size must be positive")
        out = await self._call("get_object", Bucket=self.bucket, Key=self._full_key(key))
        body = out["Body"]
        try:
            pending: builtins.list[bytes] = []
            pending_bytes = 0
            # aiohttp hands out whatever arrived (often 64 KiB); gather full chunks
            while data := await body.read(chunk_size - pending_bytes):
                pending.append(data)
                pending_bytes += len(data)
                if pending_bytes >= chunk_size:
                    yield b"".join(pending)
                    pending, pending_bytes = [], 0
            if pending:
                yield b"".join(pending)
        finally:
            body.close()

    async def size(self, key: str) -> int:
        out = await self._call("head_object", Bucket=self.bucket, Key=self._full_key(key))
        return int(out["ContentLength"])

    async def exists(self, key: str) -> bool:
        try:
            await self.size(key)
        except FileNotFoundError:
            return False
        return True

    async def delete(self, key: str) -> None:
        await self._call("delete_object", Bucket=self.bucket, Key=self._full_key(key))

    async def _list_pages(self, full_prefix: str) -> AsyncIterator[builtins.list[str]]:
        kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
        while True:
            out = await self._call("list_objects_v2", **kwargs)
            yield [obj["Key"] for obj in out.get("Contents", ())]
            if not out.get("IsTruncated"):
                return
            kwargs["ContinuationToken"] = out["NextContinuationToken"]

    async def delete_prefix(self, prefix: str) -> None:
        full_prefix = self._full_prefix(prefix, allow_root=False)
        async for keys in self._list_pages(full_prefix):
            if not keys:
                continue
            out = await self._call(
                "delete_objects",
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": k} for k in keys], "Quiet": True},
            )
            if errors := out.get("Errors"):
                first = errors[0]
                raise OSError(
                    f"could not delete {len(errors)} objects under s3://{self.bucket}/{full_prefix}, e.g. "
                    f"{first.get('Key')}: {first.get('Code')} {first.get('Message')}"
                )

    async def list(self, prefix: str = "") -> builtins.list[str]:
        full_prefix = self._full_prefix(prefix, allow_root=True)
        root = f"{self.prefix}/" if self.prefix else ""
        found: builtins.list[str] = []
        async for keys in self._list_pages(full_prefix):
            # "folder" markers some tools create (keys ending in "/") are not objects
            found.extend(k[len(root) :] for k in keys if not k.endswith("/"))
        return sorted(found)

    # handing objects to engines and clients

    def local_path(self, key: str) -> None:
        validate_key(key)
        return None

    def engine_path(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._full_key(key)}"

    def display_url(self, key: str) -> str:
        return f"s3://{self.bucket}/{quote(self._full_key(key), safe='/')}"

    def fsspec_filesystem(self) -> AbstractFileSystem:
        """One synchronous s3fs filesystem per storage (it runs its requests on fsspec's own I/O thread)."""
        if self._sync_fs is None:
            self._sync_fs = self._make_fs(asynchronous=False)
        return self._sync_fs

    def register_with_duckdb(self, con: duckdb.DuckDBPyConnection) -> None:
        """Register the ``s3`` filesystem on ``con``; one registered before (another storage's) is replaced."""
        fs = self.fsspec_filesystem()
        if "s3" in con.list_filesystems():
            con.unregister_filesystem("s3")
        con.register_filesystem(fs)

    async def _presign(self, method: str, key: str, expires_s: int) -> str:
        if not 1 <= expires_s <= MAX_PRESIGN_EXPIRY_S:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_EXPIRY_S}")
        params = {"Bucket": self.bucket, "Key": self._full_key(key)}
        async with self._boto3_lock:
            if self._boto3_client is None:
                # building a boto3 client reads config files and service models: not on the event loop
                self._boto3_client = await asyncio.to_thread(self._make_boto3_client)
        client = self._boto3_client
        # signing may have to fetch or refresh credentials (instance metadata): a thread too
        url = await asyncio.to_thread(client.generate_presigned_url, method, Params=params, ExpiresIn=expires_s)
        return str(url)

    def _make_boto3_client(self) -> Any:
        import boto3
        from botocore.config import Config

        _client_kwargs, config_kwargs = self._client_options()
        # boto3 presigns with the deprecated SigV2 unless told otherwise; SigV4 works in every region
        config = Config(signature_version="s3v4", **config_kwargs)
        session = boto3.session.Session(aws_access_key_id=self._key, aws_secret_access_key=self._secret)
        return session.client("s3", endpoint_url=self.endpoint_url, region_name=self.region, config=config)

    async def presigned_put_url(self, key: str, expires_s: int) -> str:
        return await self._presign("put_object", key, expires_s)

    async def presigned_get_url(self, key: str, expires_s: int) -> str:
        return await self._presign("get_object", key, expires_s)


def _close_sync_fs(fs: S3FileSystem) -> None:
    """Close a synchronous s3fs filesystem's client on fsspec's I/O loop, where it lives."""
    from fsspec.asyn import sync

    client = getattr(fs, "_s3", None)  # set once the filesystem connected; s3fs has no public close
    if client is not None:
        sync(fs.loop, client.close)
