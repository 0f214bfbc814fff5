"""Where decrypted payloads go: the participant's own case system.

The inbox hands every opened envelope to a `CaseSystem` inside the
transaction that records the envelope id, so `deliver` may be called again for
the same envelope after a crash and must then have no second effect. When the
person withdraws consent and asks for their data to be deleted, `erase`
removes every payload of the case; it too may be called again. The default,
`FileCaseSystem`, writes one JSON file per envelope, named by its id.
Another case system is plugged in by a ``module:factory`` spec or an entry
point in the ``trm.case_systems`` group; the factory takes the home folder.
"""

from __future__ import annotations

import ctypes
import functools
import json
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from importlib import import_module
from importlib.metadata import entry_points
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, runtime_checkable

from broker.errors import CaseSystemError, ConfigError

if TYPE_CHECKING:
    from broker.envelope import OpenedEnvelope

ENTRY_POINT_GROUP = "trm.case_systems"
INBOX_DIR = "inbox"


@runtime_checkable
class CaseSystem(Protocol):
    """Takes opened envelopes; idempotent by envelope id."""

    def deliver(self, opened: OpenedEnvelope) -> None:
        """Take `opened` into the case system; a second call for the same id changes nothing."""

    def erase(self, case: str, envelope_ids: Sequence[str]) -> int:
        """Remove every delivered payload of `case` (these envelopes); return how many it removed.

        Durable before it returns; raises `CaseSystemError` if any payload
        could not be removed, so the erasure is retried.
        """


class FileCaseSystem:
    """One private JSON file per envelope: ``FOLDER/<envelope-id>.json``."""

    def __init__(self, folder: Path) -> None:
        """Deliver into `folder`, created (mode 0700) if missing."""
        self.folder = Path(folder)
        self._written: list[Path] | None = None

    @contextmanager
    def batch(self) -> Iterator[None]:
        """Deliver several envelopes and make them all durable at once on leaving the block.

        Inside the block files are written and renamed without a sync each;
        on leaving it the whole batch is synced with one ``syncfs`` of the
        folder's file system (Linux), else file by file and then the folder.
        The inbox leaves the block before it commits, so a crash before the
        sync leaves nothing recorded and the redelivery writes the files again.
        One sync per batch instead of two per file is most of what makes a
        backlog drain fast.
        """
        written: list[Path] = []
        self._written = written
        try:
            yield
        finally:
            self._written = None
        if not written:
            return
        try:
            _sync_batch(self.folder, written)
        except OSError as e:
            raise CaseSystemError(
                f"cannot sync the case system folder {self.folder}: {e.strerror}; "
                "check that the disk is healthy and not full"
            ) from e

    def path(self, envelope_id: str) -> Path:
        """The file an envelope is delivered to."""
        return self.folder / f"{envelope_id}.json"

    def deliver(self, opened: OpenedEnvelope) -> None:
        """Write the envelope's metadata and decrypted payload atomically, mode 0600."""
        header = opened.header
        document = {
            "envelope_id": str(header.id),
            "kind": str(header.kind),
            "schema_version": header.schema_version,
            "case": header.case,
            "sender": header.sender,
            "recipients": list(header.recipients),
            "sent_at": header.sent_at.isoformat(),
            "seq": header.seq,
            "reply_to": None if header.reply_to is None else str(header.reply_to),
            "payload": opened.message.model_dump(mode="json"),
        }
        # Compact: the indented form takes Python's own encoder, not the C one,
        # at four times the cost, on the thread that applies every delivery.
        data = json.dumps(document, ensure_ascii=False).encode() + b"\n"
        path = self.path(str(header.id))
        sync = self._written is None
        try:
            try:
                _write_private(path, data, sync=sync)
            except FileNotFoundError:
                # The folder is made on first use (and again if it was removed),
                # not looked up before every file.
                self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
                _write_private(path, data, sync=sync)
            if self._written is not None:
                self._written.append(path)
        except OSError as e:
            raise CaseSystemError(
                f"cannot write to the case system folder {self.folder}: {e.strerror}; "
                "check that it exists, is writable and the disk is not full"
            ) from e

    def erase(self, case: str, envelope_ids: Sequence[str]) -> int:
        """Remove the files of `envelope_ids` (the case's deliveries), then sync the folder."""
        removed = 0
        try:
            for envelope_id in envelope_ids:
                path = self.path(envelope_id)
                if path.exists():
                    path.unlink()
                    removed += 1
            if removed:
                _sync_folder(self.folder)
        except OSError as e:
            raise CaseSystemError(
                f"cannot erase case {case} from the case system folder {self.folder}: "
                f"{e.strerror}; make the folder writable, the erasure is retried"
            ) from e
        return removed


_TEMP_FLAGS = os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW | os.O_CLOEXEC


def _write_private(path: Path, data: bytes, *, sync: bool = True) -> None:
    """Replace `path` with `data` so that readers see a whole file or none.

    The temporary file is created mode 0600 and named by the writing process
    and thread, so that concurrent writers never share one and no random
    name has to be tried with ``O_EXCL``; opening it never follows a
    symbolic link. With `sync` the file and then its folder are synced;
    without, the caller syncs the batch (`_sync_batch`).
    """
    tmp = path.parent / f".{path.name}.{os.getpid()}.{threading.get_native_id()}.tmp"
    fd = os.open(tmp, _TEMP_FLAGS, 0o600)
    try:
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        finally:
            os.close(fd)
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if sync:
        # Make the rename itself durable before the inbox transaction commits.
        _sync_folder(path.parent)


def _write_all(fd: int, data: bytes) -> None:
    """Write all of `data` to `fd`, however many ``write`` calls that takes."""
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _sync_batch(folder: Path, written: list[Path]) -> None:
    """Make `written` files and their renames in `folder` durable."""
    if _syncfs(folder):
        return
    for path in written:
        descriptor = os.open(path, os.O_RDONLY)
        try:
            os.fsync(descriptor)
        finally:
            os.close(descriptor)
    _sync_folder(folder)


def _syncfs(folder: Path) -> bool:
    """``syncfs(2)`` on `folder`'s file system; False where the C library lacks it."""
    function = getattr(_libc(), "syncfs", None)
    if function is None:
        return False
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        if function(descriptor) != 0:
            code = ctypes.get_errno()
            raise OSError(code, os.strerror(code))
    finally:
        os.close(descriptor)
    return True


@functools.cache
def _libc() -> ctypes.CDLL | None:
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _sync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def load_case_system(spec: str | None, home: Path) -> CaseSystem:
    """The case system named by `spec`, built for `home`; None means `FileCaseSystem`.

    `spec` is ``package.module:factory`` or the name of an entry point in the
    ``trm.case_systems`` group; the factory is called with `home`.
    """
    if spec is None:
        return FileCaseSystem(Path(home) / INBOX_DIR)
    factory = _factory(spec)
    try:
        system = factory(Path(home))
    except Exception as e:
        raise ConfigError(f"case system {spec!r} failed to start: {e}") from e
    if not isinstance(system, CaseSystem):
        raise ConfigError(
            f"case system {spec!r} returned {type(system).__name__}, which lacks "
            "deliver(opened) or erase(case, envelope_ids)"
        )
    return system


def _factory(spec: str) -> Callable[[Path], object]:
    if ":" in spec:
        module_name, _, attribute = spec.partition(":")
        try:
            loaded: object = getattr(import_module(module_name), attribute)
        except (ImportError, AttributeError, ValueError) as e:
            raise ConfigError(
                f"case system {spec!r} cannot be loaded ({e}): give it as "
                "package.module:factory, importable in this environment"
            ) from e
    else:
        found = entry_points(group=ENTRY_POINT_GROUP, name=spec)
        if not found:
            raise ConfigError(
                f"no case system named {spec!r} is installed (entry point group "
                f"{ENTRY_POINT_GROUP!r}); give package.module:factory instead"
            )
        try:
            loaded = next(iter(found)).load()
        except Exception as e:
            raise ConfigError(f"case system {spec!r} cannot be loaded: {e}") from e
    if not callable(loaded):
        raise ConfigError(f"case system {spec!r} is not a factory taking the home folder")
    return loaded
