"""Ray Tune's copies into a local search folder, written the way this project writes every file: atomically.

Tune writes its state to a staging folder and then copies it into the search folder in place; a kill in the middle of
that copy left a cut or 0-byte ``experiment_state-*.json`` (or searcher state, or ``params.json``) that a resume could
not read. Given to Tune as its storage filesystem, :class:`AtomicLocalFS` writes each copied file beside its target
and moves it over the target once whole (``base.files``' temporary names, so the next writer removes a killed
one's leftovers).

It also holds back Tune's deletion of a trial's older checkpoints (:class:`HeldDeletions`) until the experiment state
that a resume reads no longer names them: on the local disk, and through :class:`HoldingFS` on a URI's filesystem (S3,
GCS), where every object is written whole by one PUT already.
"""
from __future__ import annotations

import contextlib
import io
import os
import threading
from pathlib import Path

import pyarrow
import pyarrow.fs

from base.files import temporary_beside
from base.internals import CHECKPOINT_DIR, EXPERIMENT_STATE_PREFIX  # Tune's names


class HeldDeletions:
    """Tune's deletions of checkpoint folders, held until no experiment state a resume could read names them.

    Tune keeps a trial's newest ``num_to_keep`` checkpoints and deletes an older one the moment a new one is
    registered, but uploads its experiment state (which names the checkpoint each trial restores from) only now and
    then, in the background: a driver killed in between left a state naming a deleted checkpoint, and the restore of
    that trial failed on every retry (ray-project/ray#27790). Here a deletion asked for waits for two uploads of the
    experiment state that began after it: Tune launches an upload right after writing the state and only once the one
    before has ended, so the second of them holds a state written after the deletion was asked for, which names a newer
    checkpoint. Plain data under a lock; one per process (the driver's, where Tune deletes and uploads)."""

    UPLOADS = 2

    def __init__(self):
        self.lock = threading.Lock()
        self.started = 0  # uploads of the experiment state begun
        # [path, the filesystem it is on, uploads begun when it was asked for, uploads since then ended]
        self.held: list[list] = []

    def hold(self, path: str, fs) -> None:
        with self.lock:
            self.held.append([path, fs, self.started, 0])

    def upload_started(self) -> int:
        with self.lock:
            self.started += 1
            return self.started

    def upload_ended(self, serial: int) -> None:
        with self.lock:
            for h in self.held:
                h[3] += serial > h[2]
            due = [h for h in self.held if h[3] >= self.UPLOADS]
            self.held = [h for h in self.held if h[3] < self.UPLOADS]
        for path, fs, _, _ in due:
            _delete(path, fs)

    def release(self) -> list[str]:
        """Delete every held folder (the experiment has ended: its last state is written); the folders deleted."""
        with self.lock:
            due, self.held = self.held, []
        for path, fs, _, _ in due:
            _delete(path, fs)
        return [h[0] for h in due]


def _delete(path: str, fs) -> None:
    with contextlib.suppress(FileNotFoundError):
        fs.delete_dir(path)


HELD = HeldDeletions()


class _AtomicWriter(io.RawIOBase):
    """A file written beside its target and moved over it by ``close()`` (never after a failed write, nor when the
    stream is only dropped: an abandoned copy leaves the target as it was). A written experiment state lets
    :data:`HELD` delete the checkpoints that no state names any more."""

    def __init__(self, path: str):
        super().__init__()
        self._f, self._failed = None, True
        self.path, self.tmp = path, temporary_beside(Path(path))
        self.serial = HELD.upload_started() if Path(path).name.startswith(EXPERIMENT_STATE_PREFIX) else None
        self._f, self._failed = open(self.tmp, "wb"), False

    def writable(self) -> bool:
        return True

    def __del__(self):  # dropped without close(): an abandoned copy, which must not replace the target
        self._failed = True
        self.close()

    def write(self, b) -> int:
        try:
            return self._f.write(b)
        except BaseException:
            self._failed = True
            raise

    def close(self) -> None:
        if self.closed or self._f is None:
            return super().close()
        try:
            if not self._failed:
                self._f.flush()
                os.fsync(self._f.fileno())
            self._f.close()
            if not self._failed:
                os.replace(self.tmp, self.path)
                if self.serial is not None:
                    HELD.upload_ended(self.serial)
        except BaseException:
            self._failed = True
            raise
        finally:
            with contextlib.suppress(OSError):
                if self._failed:
                    os.unlink(self.tmp)
            super().close()


class _CountedUpload(io.RawIOBase):
    """An upload of Tune's experiment state to a URI: whole once ``close()`` has ended (one PUT of the complete
    object), which lets :data:`HELD` delete the checkpoints no state names any more."""

    def __init__(self, stream):
        super().__init__()
        self.stream, self.serial = stream, HELD.upload_started()

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:
        self.stream.write(b)
        return len(b)

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.stream.close()
            HELD.upload_ended(self.serial)
        finally:
            super().close()


class HoldingFS(pyarrow.fs.FileSystemHandler):
    """A URI's ``pyarrow.fs`` filesystem (S3, GCS, an S3-compatible store) as Tune's storage filesystem, with Tune's
    deletion of a trial's older checkpoints held (:class:`HeldDeletions`) as on the local disk: a driver killed
    between Tune's deletion and its next upload of the experiment state must not leave a state naming a deleted
    checkpoint. Everything else is the filesystem's own; an object store writes each object whole already.
    Given to Tune as ``RunConfig(storage_filesystem=holding_filesystem(fs), storage_path=<path inside fs>)``; the local
    disk's :class:`AtomicLocalFS` is one, with atomic writes."""

    def __init__(self, fs):
        self.fs = fs

    def __reduce__(self):  # shipped to the trials' workers with the storage settings
        return (HoldingFS, (self.fs,))

    def __eq__(self, other) -> bool:
        return isinstance(other, HoldingFS) and self.fs.equals(other.fs)

    def __hash__(self) -> int:
        return hash((HoldingFS, self.fs.type_name))

    def equals(self, other) -> bool:
        return self == other

    def get_type_name(self) -> str:
        return f"akdtune-holding-{self.fs.type_name}"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        if CHECKPOINT_DIR.fullmatch(path.rstrip("/").rsplit("/", 1)[-1]):  # Tune's deletion of an older checkpoint
            HELD.hold(path, self.fs)
        else:
            self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the storage's root")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        self.fs.copy_file(src, dest)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        stream = self.fs.open_output_stream(path, metadata=metadata)
        if path.rstrip("/").rsplit("/", 1)[-1].startswith(EXPERIMENT_STATE_PREFIX):
            return pyarrow.PythonFile(_CountedUpload(stream), mode="w")
        return stream

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path, metadata=metadata)


def holding_filesystem(fs):
    """``fs`` (a ``pyarrow.fs`` filesystem) with Tune's deletions of older checkpoints held (:class:`HoldingFS`)."""
    return pyarrow.fs.PyFileSystem(HoldingFS(fs))


class AtomicLocalFS(HoldingFS):
    """A ``pyarrow.fs.FileSystemHandler`` over the local disk whose every written file is atomic: what Ray Tune copies
    into a local search folder (its experiment state, searcher and callback states, a trial's params.json and
    result.json, checkpoints) is, after a kill at any moment, the old file or the new one, never a cut or 0-byte one.
    Given to Tune as ``RunConfig(storage_filesystem=atomic_local_filesystem())``; Tune's deletions of older
    checkpoints are held as by :class:`HoldingFS`, and everything but writing is the local filesystem's own."""

    def __init__(self):
        super().__init__(pyarrow.fs.LocalFileSystem())

    def __reduce__(self):  # shipped to the trials' workers with the storage settings
        return (AtomicLocalFS, ())

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalFS)

    def __hash__(self) -> int:
        return hash(AtomicLocalFS)

    def get_type_name(self) -> str:
        return "akdtune-atomic-local"

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_AtomicWriter(path), mode="w")  # counts an upload of the experiment state itself


def atomic_local_filesystem():
    """The local filesystem, every file written atomically (:class:`AtomicLocalFS`), as a ``pyarrow.fs.FileSystem``."""
    return pyarrow.fs.PyFileSystem(AtomicLocalFS())
