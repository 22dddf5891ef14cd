"""Where a search folder lives: a local folder, or a URI of any filesystem ``pyarrow.fs`` opens (``s3://bucket/runs``,
``gs://bucket/runs``, an S3-compatible store such as MinIO with ``?endpoint_override=host:port&scheme=http``, or
the ``AWS_ENDPOINT_URL`` environment variable). Ray's own storage opens the same URIs the same way.

A search on a URI runs from a **working copy** on the driver (:class:`Mirror`): the tool's files (the records, the
study journal Optuna appends to, the confirmation's records, ``best/``, the summaries, the report: what
``base.layout.is_own`` names) are written there as in a local folder, and each is uploaded as it changes, as one
PUT of the complete file, so a partial upload never looks whole (object stores have no rename; each record also
carries its checksum). Ray writes its own files (its experiment state, trial folders, checkpoints) to the URI
itself, from the driver and the worker nodes. A session starts from the URI alone: its working copy is emptied and
downloaded again (:meth:`Mirror.reset`, :meth:`Mirror.pull`), so a resume on a new machine needs nothing from the
first one; every check of a local folder then runs on the copy. Checkpoints are downloaded only where one is read.

This module imports neither Ray nor the rest of the project's packages.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
from pyarrow.lib import ArrowException

from base.errors import UserError
from base.internals import CHECKPOINT_DIR  # Tune's checkpoint folders

# What a store's calls raise: OSError for most, pyarrow's own ArrowException for some (a bad credentials file of gs://)
STORE_ERRORS = (OSError, ArrowException)

DEFAULT_WORK_ROOT = "~/.cache/akdtune/work"


def is_uri(path: str | Path | None) -> bool:
    """Whether ``path`` names a URI (``s3://...``), not a local path."""
    return isinstance(path, str) and "://" in path


def join(base: str, *names: str) -> str:
    """``base/names...``: a local path, or a URI with the names added to its path and its query (an endpoint) kept."""
    if not is_uri(base):
        return str(Path(base, *names))
    parts = urllib.parse.urlsplit(base)
    path = "/".join([parts.path.rstrip("/"), *(n.strip("/") for n in names)])
    return urllib.parse.urlunsplit(parts._replace(path=path))


def filesystem(uri: str):
    """(``pyarrow.fs`` filesystem, path inside it) of a URI. Raises UserError in one line where it cannot be opened."""
    try:
        return pafs.FileSystem.from_uri(uri)
    except (*STORE_ERRORS, ValueError, TypeError) as e:
        raise UserError(f"cannot open the storage {uri}: {_first_line(e)}; check the URI (s3://bucket/folder, "
                        "gs://bucket/folder; an S3-compatible store: ?endpoint_override=host:port&scheme=http)") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return text[0] if text else type(e).__name__


def unreachable(uri: str, e: BaseException, doing: str) -> UserError:
    """One line for a storage that cannot be read or written: what failed and what to check."""
    return UserError(f"cannot {doing} {uri}: {_first_line(e)}; check the bucket, its credentials (e.g. "
                     "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS) and the endpoint")


def exists(uri: str, rel: str) -> bool:
    """Whether the file or folder ``rel`` exists under the URI."""
    fs, base = filesystem(uri)
    try:
        return fs.get_file_info(f"{base}/{rel}").type != pafs.FileType.NotFound
    except STORE_ERRORS as e:
        raise unreachable(uri, e, "read") from None


def bounded(call: Callable[..., Any], seconds: float, uri: str, *args) -> Any:
    """``call(*args)``, where a store that does not answer within ``seconds`` (a cloud SDK looking for credentials
    it will never find, an endpoint that takes the connection and says nothing) is one line instead of a silent
    wait: UserError. What ``call`` raises is raised here."""
    out: dict[str, Any] = {}

    def run() -> None:
        try:
            out["value"] = call(*args)
        except BaseException as e:  # noqa: BLE001 - handed to the caller's thread
            out["error"] = e

    worker = threading.Thread(target=run, name="akdtune-storage", daemon=True)
    worker.start()
    worker.join(seconds)
    if worker.is_alive():
        raise UserError(f"the storage {uri} did not answer within {seconds:.0f} s; check the endpoint, the network "
                        "and the credentials (e.g. AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, "
                        "GOOGLE_APPLICATION_CREDENTIALS)")
    if "error" in out:
        raise out["error"]
    return out.get("value")


def check_bucket(uri: str, fs=None, base: str | None = None) -> None:
    """Refuse in one line a URI whose bucket (its first folder) does not exist."""
    if fs is None:
        fs, base = filesystem(uri)
    bucket = base.strip("/").split("/")[0]
    if fs.type_name == "local":  # a file:// URI: its first folder, from the root
        bucket = "/" + bucket
    try:
        found = fs.get_file_info(bucket).type != pafs.FileType.NotFound
    except STORE_ERRORS as e:
        raise unreachable(uri, e, "read") from None
    if not found:
        raise UserError(f"the storage {uri} has no bucket {bucket!r}; create it (or pass another --storage)")


def work_folder(uri: str, name: str, root: str | None = None) -> Path:
    """The driver's working copy of the search at ``uri``: ``<root>/<name>-<hash of the URI>`` (root: ``--work-dir``,
    else ``$AKDTUNE_WORK_DIR``, else ``~/.cache/akdtune/work``)."""
    root = root or os.environ.get("AKDTUNE_WORK_DIR") or DEFAULT_WORK_ROOT
    digest = hashlib.sha256(uri.encode("utf-8")).hexdigest()[:12]
    return Path(root).expanduser().resolve() / f"{name}-{digest}"


class Mirror:
    """A search folder at a URI and the driver's working copy of it (``work``); ``own(rel)`` says which files are
    the tool's own, the ones the copy uploads. Its state is the last uploaded or downloaded (size, mtime) of each
    own file, so an unchanged file is not sent again."""

    def __init__(self, uri: str, work: str | Path, own: Callable[[str], bool]):
        self.uri, self.work, self.own = uri, Path(work), own
        self.fs, self.base = filesystem(uri)
        self.synced: dict[str, tuple[int, int]] = {}

    def remote(self, rel: str) -> str:
        return f"{self.base.rstrip('/')}/{rel}"

    def check(self) -> None:
        """Refuse in one line, before anything is written, a URI whose bucket (its first folder) does not exist."""
        check_bucket(self.uri, self.fs, self.base)

    def reset(self) -> None:
        """Empty the working copy (the URI is the record; nothing local from an earlier session is used)."""
        if self.work.exists():
            shutil.rmtree(self.work)
        self.work.mkdir(parents=True)
        self.synced.clear()

    def files(self, under: str = "") -> list[tuple[str, int]]:
        """(path relative to the search folder, size) of every file under ``under`` at the URI."""
        top = self.remote(under).rstrip("/")
        try:
            infos = self.fs.get_file_info(pafs.FileSelector(top, recursive=True, allow_not_found=True))
        except STORE_ERRORS as e:
            raise unreachable(self.uri, e, "list") from None
        start = self.base.strip("/")
        return sorted((info.path.strip("/")[len(start):].lstrip("/"), info.size) for info in infos
                      if info.type == pafs.FileType.File)

    def pull(self, under: str = "", checkpoints: str = "none", own: bool = True) -> int:
        """Download the files under ``under`` into the working copy; the number downloaded.

        ``checkpoints``: "none" (Tune's checkpoint folders left at the URI), "latest" (each trial's newest only) or
        "all". ``own=False`` leaves the tool's own files of the copy as they are (the copy is newer within a session).
        """
        chosen = _chosen_checkpoints(self.files(under), checkpoints)
        for rel in chosen:
            if not own and self.own(rel):
                continue
            self._download(rel)
        return len(chosen)

    def _download(self, rel: str) -> None:
        local = self.work / rel
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.{os.getpid()}.download")
        try:
            with self.fs.open_input_stream(self.remote(rel)) as src, open(tmp, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)
            os.replace(tmp, local)
        except STORE_ERRORS as e:
            tmp.unlink(missing_ok=True)
            raise unreachable(self.uri, e, "download from") from None
        if self.own(rel):
            self.synced[rel] = _stamp(local)

    def push(self, path: str | Path) -> bool:
        """Upload one own file of the working copy as one whole object, if it changed; whether it was sent."""
        path = Path(path)
        try:
            rel = path.resolve().relative_to(self.work.resolve()).as_posix()
        except ValueError:
            return False
        if not self.own(rel) or not path.is_file():
            return False
        stamp = _stamp(path)
        if self.synced.get(rel) == stamp:
            return False
        data = path.read_bytes()  # read whole first: the object is written in one piece or not at all
        try:
            if self.fs.type_name == "local":  # a file:// URI (an object store has no folders to make)
                self.fs.create_dir(self.remote(rel).rsplit("/", 1)[0], recursive=True)
            with self.fs.open_output_stream(self.remote(rel)) as out:
                out.write(data)
        except STORE_ERRORS as e:
            raise unreachable(self.uri, e, "upload to") from None
        self.synced[rel] = stamp
        return True

    def push_changed(self) -> int:
        """Upload every own file of the working copy that changed since it was last sent; how many were sent."""
        return sum(self.push(p) for p in _walk(self.work))

    def remove(self, rel: str) -> None:
        """Delete the folder ``rel`` of the search at the URI (a confirmation started again)."""
        try:
            self.fs.delete_dir(self.remote(rel))
        except FileNotFoundError:
            pass
        except STORE_ERRORS as e:
            raise unreachable(self.uri, e, "delete from") from None

    def latest_checkpoint_of(self, trial_rel: str) -> None:
        """Download the newest checkpoint of the trial folder ``trial_rel`` (relative to the search) if not here."""
        self.pull(trial_rel, checkpoints="latest", own=False)


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_size, st.st_mtime_ns


def _walk(top: Path) -> Iterator[Path]:
    for root, _, names in os.walk(top):
        for n in sorted(names):
            if not n.startswith("."):  # temporary files of writers, the journal's lock
                yield Path(root, n)


def _chosen_checkpoints(files: list[tuple[str, int]], checkpoints: str) -> list[str]:
    """The relative paths to download: everything, less the checkpoint folders not asked for."""
    if checkpoints not in ("none", "latest", "all"):
        raise ValueError(checkpoints)
    newest: dict[str, int] = {}
    for rel, _ in files:
        parent, index = _checkpoint(rel)
        if parent is not None:
            newest[parent] = max(newest.get(parent, -1), index)
    out = []
    for rel, _ in files:
        parent, index = _checkpoint(rel)
        if parent is None or checkpoints == "all" or (checkpoints == "latest" and newest[parent] == index):
            out.append(rel)
    return out


def _checkpoint(rel: str) -> tuple[str | None, int]:
    """(the folder holding it, its index) where ``rel`` is inside a Tune checkpoint folder; else (None, -1)."""
    parts = rel.split("/")
    for i, part in enumerate(parts[:-1]):
        m = CHECKPOINT_DIR.fullmatch(part)
        if m:
            return "/".join(parts[:i]), int(m.group(1))
    return None, -1


# The mirrors of this process (the driver's), by working copy: what the record writers upload through.
_MIRRORS: dict[str, Mirror] = {}


def attach(mirror: Mirror) -> Mirror:
    _MIRRORS[str(mirror.work.resolve())] = mirror
    return mirror


def detach(mirror: Mirror) -> None:
    _MIRRORS.pop(str(mirror.work.resolve()), None)


def mirror_of(path: str | Path) -> Mirror | None:
    """The mirror whose working copy holds ``path`` (None for a local search, and in a trial's worker)."""
    if not _MIRRORS:
        return None
    p = str(Path(path).resolve())
    for work, m in _MIRRORS.items():
        if p == work or p.startswith(work + os.sep):
            return m
    return None


def written(path: str | Path) -> None:
    """A file of a search folder was written: where the folder is a working copy, upload it now."""
    m = mirror_of(path)
    if m is not None:
        m.push(path)


def push_changed(folder: str | Path) -> None:
    """Upload what changed in the working copy holding ``folder`` (nothing for a local search)."""
    m = mirror_of(folder)
    if m is not None:
        m.push_changed()


def local_file(folder: str, rel: str) -> tuple[Path, Callable[[], None]]:
    """A local path of the file ``rel`` of the search folder ``folder`` (a URI: downloaded into a temporary folder),
    and what to call when done with it. Used where a trial's worker reads a file of the search (a confirmation
    run continues its search trial's checkpoint)."""
    if not is_uri(folder):
        return Path(folder) / rel, lambda: None

    fs, base = filesystem(folder)
    tmp = Path(tempfile.mkdtemp(prefix="akdtune-"))
    local = tmp / Path(rel).name
    try:
        with fs.open_input_stream(f"{base.rstrip('/')}/{rel}") as src, open(local, "wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)
    except STORE_ERRORS as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise unreachable(folder, e, "download from") from None
    return local, lambda: shutil.rmtree(tmp, ignore_errors=True)
