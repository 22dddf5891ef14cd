"""Ray Tune's copies into a local search folder, written the way this project writes every file: atomically.

Tune writes its state to a staging folder and then copies it into the search folder in place; a kill in the middle of
that copy left a cut or 0-byte ``experiment_state-*.json`` (or searcher state, or ``params.json``) that a resume could
not read. Given to Tune as its storage filesystem, :class:`AtomicLocalFS` writes each copied file beside its target
and moves it over the target once whole (``trainable.files``' temporary names, so the next writer removes a killed
one's leftovers).
"""
from __future__ import annotations

import contextlib
import io
import os
from pathlib import Path

import pyarrow
import pyarrow.fs

from trainable.files import temporary_beside


class _AtomicWriter(io.RawIOBase):
    """A file written beside its target and moved over it by ``close()`` (never after a failed write, nor when the
    stream is only dropped: an abandoned copy leaves the target as it was)."""

    def __init__(self, path: str):
        super().__init__()
        self._f, self._failed = None, True
        self.path, self.tmp = path, temporary_beside(Path(path))
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
        except BaseException:
            self._failed = True
            raise
        finally:
            with contextlib.suppress(OSError):
                if self._failed:
                    os.unlink(self.tmp)
            super().close()


class AtomicLocalFS(pyarrow.fs.FileSystemHandler):
    """A ``pyarrow.fs.FileSystemHandler`` over the local disk whose every written file is atomic: what Ray Tune copies
    into a local search folder (its experiment state, searcher and callback states, a trial's params.json and
    result.json, checkpoints) is, after a kill at any moment, the old file or the new one, never a cut or 0-byte one.
    Given to Tune as ``RunConfig(storage_filesystem=atomic_local_filesystem())``; everything but writing is the local
    filesystem's own."""

    def __init__(self):
        self.fs = pyarrow.fs.LocalFileSystem()

    def __reduce__(self):  # shipped to the trials' workers with the storage settings
        return (AtomicLocalFS, ())

    def __eq__(self, other) -> bool:
        return isinstance(other, AtomicLocalFS)

    def __hash__(self) -> int:
        return hash(AtomicLocalFS)

    def equals(self, other) -> bool:
        return isinstance(other, AtomicLocalFS)

    def get_type_name(self) -> str:
        return "akdtune-atomic-local"

    def normalize_path(self, path):
        return self.fs.normalize_path(path)

    def get_file_info(self, paths):
        return self.fs.get_file_info(paths)

    def get_file_info_selector(self, selector):
        return self.fs.get_file_info(selector)

    def create_dir(self, path, recursive):
        self.fs.create_dir(path, recursive=recursive)

    def delete_dir(self, path):
        self.fs.delete_dir(path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        self.fs.delete_dir_contents(path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        raise OSError("refusing to delete the contents of the root folder")

    def delete_file(self, path):
        self.fs.delete_file(path)

    def move(self, src, dest):
        self.fs.move(src, dest)

    def copy_file(self, src, dest):
        with self.fs.open_input_stream(src) as source, self.open_output_stream(dest, None) as target:
            while chunk := source.read(1 << 20):
                target.write(chunk)

    def open_input_stream(self, path):
        return self.fs.open_input_stream(path)

    def open_input_file(self, path):
        return self.fs.open_input_file(path)

    def open_output_stream(self, path, metadata):
        return pyarrow.PythonFile(_AtomicWriter(path), mode="w")

    def open_append_stream(self, path, metadata):
        return self.fs.open_append_stream(path)


def atomic_local_filesystem():
    """The local filesystem, every file written atomically (:class:`AtomicLocalFS`), as a ``pyarrow.fs.FileSystem``."""
    return pyarrow.fs.PyFileSystem(AtomicLocalFS())
