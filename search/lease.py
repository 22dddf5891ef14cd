"""One driver per search: the lease a driver holds on its search folder for its whole session.

A second driver on the same search (a ``--resume`` while it runs, or a second new search under the same name) is
refused in one line naming the holder, before it reads or writes anything else of the search. How the lease is
taken depends on what the storage offers:

- **A local or NFS folder**: an exclusive ``flock`` on ``akdtune/driver.lock``, whose text names the holder. The
  kernel (or the NFS server, within its lease time) releases it when the holder's process ends, however it ends,
  so a killed driver's search is taken over at once; a live holder is never taken over.
- **A URI** (``s3://``, ``gs://``, S3-compatible stores): ``pyarrow.fs`` offers no conditional create, so each
  driver writes a claim object of its own under ``akdtune/lease/`` and then lists them. A claim wins only where
  its driver sees no other live claim or holder; it then becomes the holder and its object is rewritten every
  ``HEARTBEAT_S`` seconds. Of two drivers, the one that writes second lists after both writes and sees the
  first, so at most one wins (two at once may both step back and try again). This is safe wherever a listing
  shows every object written before it: S3 and GCS are strongly consistent. A holder whose object has not been
  rewritten for ``STALE_S`` seconds (by the store's own clock: the age is told from the objects' modification
  times, not the machines' clocks), or one on this machine whose process is gone, is taken over; ``--take-over``
  takes a lease whose holder looks alive (a driver on a machine that was switched off). A holder that finds its
  lease taken, or that cannot rewrite it for longer than it stays valid, stops at once (it is killed, as by
  ``kill -9``, which every record of the search survives), so that it writes nothing beside the new holder.
"""
from __future__ import annotations

import contextlib
import fcntl
import getpass
import json
import os
import random
import signal
import socket
import sys
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.fs as pafs

from base import storage
from base.errors import UserError
from base.files import missing_folders, running
from base.layout import LEASE_DIR, LOCK_FILE, tune_started

HEARTBEAT_S = float(os.environ.get("AKDTUNE_LEASE_HEARTBEAT_S", 20))  # a holder on a URI rewrites its lease this often
STALE_S = float(os.environ.get("AKDTUNE_LEASE_STALE_S", 180))  # ... and is taken over after this long without
FIRST_CALL_S = float(os.environ.get("AKDTUNE_STORAGE_TIMEOUT_S", 60))  # the first call to a URI's store answers within
CLAIM_TRIES = 6


@dataclass(frozen=True)
class Holder:
    """Who holds (or claims) a lease: plain data, written into the lease as JSON."""
    token: str
    host: str
    boot: str  # the machine's boot id: a holder on this host from before a reboot is gone
    pid: int
    pid_started: str  # the process's start time (a pid reused by another process is not the holder)
    user: str
    since: str  # when it took the lease (UTC)
    command: str

    @staticmethod
    def me(command: str) -> Holder:
        return Holder(token=uuid.uuid4().hex, host=socket.gethostname(), boot=_boot_id(), pid=os.getpid(),
                      pid_started=_started(os.getpid()), user=_user(), since=time.strftime("%Y-%m-%d %H:%M:%S UTC",
                      time.gmtime()), command=command[:300])

    @staticmethod
    def of(data: dict[str, Any]) -> Holder:
        fields = Holder.__dataclass_fields__
        return Holder(**{k: (int(data[k]) if k == "pid" else str(data[k])) for k in fields})

    def gone(self) -> bool:
        """Whether this holder is known to be gone: it ran on this machine and its process has ended (or the
        machine was rebooted since). A holder on another machine is never known gone (its heartbeat tells)."""
        if self.host != socket.gethostname():
            return False
        if self.boot and _boot_id() and self.boot != _boot_id():
            return True
        return not running(self.pid) or (bool(self.pid_started) and _started(self.pid) not in ("", self.pid_started))

    def words(self) -> str:
        return f"pid {self.pid} on {self.host} (user {self.user}, since {self.since})"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _started(pid: int) -> str:
    """The start time of process ``pid`` in clock ticks since boot ('' where it cannot be read)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return ""


def _gen(data: dict[str, Any]) -> int:
    try:
        return int(data.get("gen") or 0)
    except (TypeError, ValueError):
        return 0


def _user() -> str:
    try:

        return getpass.getuser()
    except (KeyError, OSError):
        return str(os.getuid())


def refused(name: str, holder: Holder, extra: str) -> UserError:
    return UserError(f"search {name!r} is in use by another driver: {holder.words()}{extra}; wait for it to end or "
                     "stop it (a search has one driver at a time)")


class LocalLease:
    """The lease of a search in a local or NFS folder: ``flock`` on ``akdtune/driver.lock``."""

    def __init__(self, folder: str, name: str, holder: Holder):
        self.folder, self.name, self.holder = Path(folder), name, holder
        self.path = self.folder / LOCK_FILE
        self.fd: int | None = None
        self.made: list[Path] = []  # folders this lease created (removed again where the search never started)

    def acquire(self, take_over: bool = False) -> None:
        missing = missing_folders(self.path.parent)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.made = missing
            for _ in range(CLAIM_TRIES):
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    os.close(fd)
                    raise self._held(take_over) from None
                # The holder before removed the file as it let go: this lock is on a file nobody else will open
                if os.path.exists(self.path) and os.stat(self.path).st_ino == os.fstat(fd).st_ino:
                    break
                os.close(fd)
            else:
                raise UserError(f"cannot take the lease of search {self.name!r} ({self.path}): it keeps changing; "
                                "another driver is starting it: try again")
            os.ftruncate(fd, 0)
            os.write(fd, json.dumps(self.holder.__dict__).encode())
            os.fsync(fd)
        except OSError as e:
            raise UserError(f"cannot write into {self.folder} ({e.strerror or e}); pass a --storage you can "
                            "write to") from None
        self.fd = fd

    def _held(self, take_over: bool) -> UserError:
        try:
            holder = Holder.of(json.loads(self.path.read_text() or "{}"))
        except (OSError, ValueError, KeyError, TypeError):
            holder = None
        if holder is None:
            return UserError(f"search {self.name!r} is in use by another driver (it holds {self.path}); wait for it "
                             "to end or stop it (a search has one driver at a time)")
        extra = (" (--take-over takes only a lease whose holder is gone; in a local folder it is let go the moment "
                 f"the holder ends: stop it, e.g. kill {holder.pid} on {holder.host})") if take_over else ""
        return refused(self.name, holder, extra)

    def proof(self) -> tuple[str, str]:
        """(the lease's path relative to the search folder, the text every node must read there)."""
        return LOCK_FILE, self.holder.token

    def release(self, started: bool) -> None:
        if self.fd is None:
            return
        with contextlib.suppress(OSError):
            os.unlink(self.path)  # before the unlock: a driver waiting on this file sees it replaced and tries again
        with contextlib.suppress(OSError):
            os.close(self.fd)
        self.fd = None
        if not started:  # a search refused before it started leaves no folder behind
            for p in reversed(self.made):
                with contextlib.suppress(OSError):
                    p.rmdir()


class UriLease:
    """The lease of a search at a URI: claim objects under ``akdtune/lease/``, listed; the holder's rewritten."""

    def __init__(self, uri: str, name: str, holder: Holder):
        self.uri, self.name, self.holder = uri, name, holder
        self.fs = self.dir = self.mine = None  # opened in acquire (the first call to the store, bounded in time)
        self.beats = 0
        self.gen = 0  # takes over from every holder of a lower generation
        self.stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.last_ok = 0.0

    # -- the store
    def _put(self, state: str) -> float:
        """Write this driver's object; its modification time by the store's clock (seconds)."""
        data = json.dumps({**self.holder.__dict__, "state": state, "gen": self.gen, "beat": self.beats}).encode()
        if self.fs.type_name == "local":  # a file:// URI (an object store has no folders to make)
            self.fs.create_dir(self.dir, recursive=True)
        with self.fs.open_output_stream(self.mine) as out:
            out.write(data)
        return self.fs.get_file_info(self.mine).mtime.timestamp()

    def _others(self) -> list[tuple[str, float, dict[str, Any]]]:
        """(path, modification time, content) of every other lease object ({} where it cannot be read)."""
        out = []
        for info in self.fs.get_file_info(pafs.FileSelector(self.dir, allow_not_found=True)):
            if info.type != pafs.FileType.File or info.path.rstrip("/").endswith(f"/{self.holder.token}.json"):
                continue
            try:
                with self.fs.open_input_stream(info.path) as f:
                    data = json.loads(f.read(1 << 16) or b"{}")
            except (*storage.STORE_ERRORS, ValueError):
                data = {}  # gone since it was listed, or being written
            if not isinstance(data, dict):
                data = {}
            out.append((info.path, info.mtime.timestamp() if info.mtime else 0.0, data))
        return out

    def _delete(self, path: str) -> None:
        with contextlib.suppress(*storage.STORE_ERRORS):
            self.fs.delete_file(path)

    # -- taking it
    def acquire(self, take_over: bool = False) -> None:
        try:
            storage.bounded(self._try_acquire, FIRST_CALL_S, self.uri, take_over)
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 - every store's error (pyarrow's ArrowException too), one line
            raise storage.unreachable(self.uri, e, "write to") from None

    def _try_acquire(self, take_over: bool) -> None:
        self.fs, base = storage.filesystem(self.uri)
        storage.check_bucket(self.uri, self.fs, base)
        self.dir = f"{base.rstrip('/')}/{LEASE_DIR}"
        self.mine = f"{self.dir}/{self.holder.token}.json"
        for _ in range(CLAIM_TRIES):
            now = self._put("claiming")
            holders, claims, stale, holders_at = [], [], [], []
            others = self._others()
            self.gen = 1 + max([_gen(d) for _, _, d in others] or [0])
            for path, mtime, data in others:
                try:
                    other = Holder.of(data)
                except (KeyError, TypeError, ValueError):
                    other = None
                if now - mtime > STALE_S or (other is not None and other.gone()):
                    stale.append(path)
                elif data.get("state") == "held" and other is not None:
                    holders.append((other, now - mtime))
                    holders_at.append((path, mtime, data))
                else:
                    claims.append(path)  # another driver is claiming it this moment (or writing its claim)
            if holders and not take_over:
                self._delete(self.mine)
                other, age = holders[0]
                raise refused(self.name, other, f", last heard of {age:.0f} s ago (a driver that is gone is taken "
                                                f"over after {STALE_S:.0f} s without a heartbeat, or now with "
                                                "--take-over)")
            if claims:
                self._delete(self.mine)
                time.sleep(random.uniform(0.5, 2.0))
                continue
            self._put("held")
            for path in stale + ([p for p, _, _ in holders_at] if take_over else []):
                self._delete(path)
            if take_over and holders and min(age for _, age in holders) < 2 * HEARTBEAT_S:
                # a holder heard of recently stops at its next heartbeat, when it finds its lease gone
                print(f"taking over search {self.name!r} from {holders[0][0].words()}: waiting "
                      f"{HEARTBEAT_S + 5:.0f} s for it to stop", flush=True)
                time.sleep(HEARTBEAT_S + 5)
            self.last_ok = time.monotonic()
            self.thread = threading.Thread(target=self._heartbeat, name="akdtune-lease", daemon=True)
            self.thread.start()
            return
        raise UserError(f"search {self.name!r}: another driver is taking it at the same moment; wait, then run the "
                        "command again")

    # -- holding it
    def _heartbeat(self) -> None:
        while not self.stop.wait(HEARTBEAT_S):
            try:
                self.beats += 1
                self._put("held")
                others = self._others()
                self.last_ok = time.monotonic()
                newer = [(d, _gen(d)) for _, _, d in others if d.get("state") == "held" and _gen(d) > self.gen]
                for path, _, d in others:  # a holder this one took over from, come back: it stops on its own
                    if d.get("state") == "held" and _gen(d) < self.gen:
                        self._delete(path)
            except Exception:  # noqa: BLE001 - the store did not answer: try again, until the lease would lapse
                if time.monotonic() - self.last_ok > STALE_S - HEARTBEAT_S:
                    self._lost("its storage did not answer for longer than a lease stays valid")
                continue
            if newer and not self.stop.is_set():
                taker = max(newer, key=lambda x: x[1])[0]
                self._lost(f"it was taken over by pid {taker.get('pid')} on {taker.get('host')}")

    def _lost(self, why: str) -> None:
        self._delete(self.mine)
        print(f"error: this driver lost the lease of search {self.name!r}: {why}; it stops now so as to write "
              "nothing beside the new driver", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

    def proof(self) -> tuple[str, str]:
        return f"{LEASE_DIR}/{self.holder.token}.json", self.holder.token

    def release(self, started: bool) -> None:
        if self.thread is None:
            return
        self.stop.set()
        self.thread.join(timeout=HEARTBEAT_S + 30)
        self.thread = None
        with contextlib.suppress(Exception):
            self.fs.delete_file(self.mine)


@contextlib.contextmanager
def held(path: str, name: str, command: str, take_over: bool = False):
    """The lease of the search at ``path`` for the block: taken first (see :func:`take`), let go however it ends."""
    lease = take(path, name, command, take_over)
    try:
        yield lease
    finally:
        lease.release(started=tune_started(path) if not storage.is_uri(path) else True)


def take(path: str, name: str, command: str, take_over: bool = False) -> LocalLease | UriLease:
    """Take the lease of the search at ``path`` (a local folder or a URI) for this driver, or raise UserError naming
    the holder. Nothing else of the search is read or written before it."""
    holder = Holder.me(command)
    lease = UriLease(path, name, holder) if storage.is_uri(path) else LocalLease(path, name, holder)
    lease.acquire(take_over)
    return lease


def check_proof(path: str, rel: str, token: str) -> str | None:
    """On a node of a cluster: whether it sees the search at ``path`` as the driver does (it reads the driver's lease
    and finds the driver's token) and can write there (a probe object written and deleted). None, or what is wrong."""
    where = storage.join(path, rel)
    try:
        if storage.is_uri(path):
            fs, base = storage.filesystem(path)
            with fs.open_input_stream(f"{base.rstrip('/')}/{rel}") as f:
                seen = f.read(1 << 16).decode(errors="replace")
            probe = f"{base.rstrip('/')}/{LEASE_DIR}/probe-{uuid.uuid4().hex}"
            with fs.open_output_stream(probe) as out:
                out.write(b"probe")
            fs.delete_file(probe)
        else:
            seen = Path(where).read_text(errors="replace")
            probe = Path(path, LEASE_DIR + f"-probe-{uuid.uuid4().hex}")
            probe.write_bytes(b"probe")
            probe.unlink()
    except FileNotFoundError:
        return f"it does not see {where}"
    except Exception as e:  # noqa: BLE001 - the node's own reason, in one line
        first = (str(e).strip().splitlines() or [""])[0][:160]
        return f"it cannot read and write {path} ({type(e).__name__}: {first})"
    return None if token in seen else f"it sees another {where} than the driver's"
