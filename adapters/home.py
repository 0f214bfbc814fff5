"""A participant's home folder and the settings a process reads around it.

The home (docs/architecture.md, "A participant's home folder") holds the keys,
the pinned authority key, the installed directory and, by default, the
database and the case folder. Everything that changes at run time may live
elsewhere, so that a home can be mounted read-only (docker/compose.yml):

| setting | flag | environment | default |
| --- | --- | --- | --- |
| database | ``--database-url`` | ``TRM_DATABASE_URL`` | ``sqlite:///HOME/trm.db`` |
| database password | | ``TRM_DATABASE_PASSWORD_FILE`` | none (merged into the URL) |
| RabbitMQ | ``--amqp-url`` | ``TRM_AMQP_URL`` | ``amqp://127.0.0.1:5672/`` |
| vhost | ``--vhost`` | ``TRM_AMQP_VHOST`` | ``HOME/amqp-vhost``, else the URL's, else ``/`` |
| RabbitMQ password | | ``TRM_AMQP_PASSWORD_FILE`` | ``HOME/amqp-password`` (required) |
| case folder | ``--case-dir`` | ``TRM_CASE_DIR`` | ``HOME/inbox`` |
| case system | ``--case-system`` | ``TRM_CASE_SYSTEM`` | one JSON file per message |
| adapter status | | ``TRM_STATUS_FILE`` | ``HOME/adapter-status.json`` |

``TRM_AMQP_URL`` may list a cluster's nodes, comma-separated; a connection
tries them in turn (`broker.transport.open_connection`).
``HOME/amqp-vhost`` is written by `trm broker provision --keys-root`, so that
once provisioned a home knows its vhost and no command repeats it.
The RabbitMQ user is always the participant id; credentials in the AMQP URL
are ignored, so a process never logs in as ``guest`` by accident.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapters.casesystem import INBOX_DIR, CaseSystem, FileCaseSystem, load_case_system
from broker.database import home_database_url, open_database, storage_errors
from broker.directory import DIRECTORY_FILE, Directory, reload_home_directory
from broker.envelope import Recipient
from broker.errors import BrokerUnavailable, ConfigError, LocalUnavailable, TrmError
from broker.keys import ParticipantKeys, Sender, load_keys
from broker.topology import PASSWORD_FILE, read_vhost
from broker.transport import AmqpSettings

DEFAULT_AMQP_URL = "amqp://127.0.0.1:5672/"
ENV_AMQP_URL = "TRM_AMQP_URL"
ENV_VHOST = "TRM_AMQP_VHOST"
ENV_AMQP_PASSWORD_FILE = "TRM_AMQP_PASSWORD_FILE"  # noqa: S105 - a variable name
ENV_DATABASE_URL = "TRM_DATABASE_URL"
ENV_DATABASE_PASSWORD_FILE = "TRM_DATABASE_PASSWORD_FILE"  # noqa: S105 - a variable name
ENV_CASE_DIR = "TRM_CASE_DIR"
ENV_CASE_SYSTEM = "TRM_CASE_SYSTEM"
ENV_STATUS_FILE = "TRM_STATUS_FILE"
STATUS_FILE = "adapter-status.json"
"""Where a running adapter records whether its local side takes deliveries (`trm health`)."""


def _read_secret(path: Path, setting: str) -> str:
    try:
        secret = path.read_text(encoding="utf-8").strip()
    except OSError as e:
        raise ConfigError(
            f"cannot read {setting} file {path}: {e.strerror}; run `trm broker provision "
            f"--keys-root` to write it, or point {setting} at the file holding the password"
        ) from e
    if not secret:
        raise ConfigError(f"{setting} file {path} is empty: put the password in it")
    return secret


@dataclass
class Home:
    """A participant's home folder with its resolved settings.

    Keys are loaded once; the directory is reloaded whenever
    ``HOME/directory.json`` changes on disk, so a directory with a new serial
    (installed with ``trm directory install``) takes effect without a restart,
    and one with a lower serial is refused.
    """

    path: Path
    database_url: str
    amqp_url: str
    vhost: str | None
    amqp_password_file: Path
    case_dir: Path
    case_system_spec: str | None = None
    status_file: Path | None = None
    """The adapter's status file; None means ``HOME/adapter-status.json``."""
    _keys: ParticipantKeys | None = field(default=None, init=False, repr=False)
    _directory: Directory | None = field(default=None, init=False, repr=False)
    _directory_stamp: tuple[int, int, int] | None = field(default=None, init=False, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @classmethod
    def resolve(
        cls,
        path: Path,
        *,
        database_url: str | None = None,
        amqp_url: str | None = None,
        vhost: str | None = None,
        case_dir: Path | None = None,
        case_system: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> Home:
        """The home at `path`; each setting from its argument, else environment, else default."""
        env = os.environ if environ is None else environ
        home = Path(path)
        if not home.is_dir():
            raise ConfigError(f"--home {home} is not a folder: create it with `trm init`")
        chosen_case_dir = case_dir or (Path(env[ENV_CASE_DIR]) if env.get(ENV_CASE_DIR) else None)
        password_file = env.get(ENV_AMQP_PASSWORD_FILE)
        status_file = env.get(ENV_STATUS_FILE)
        return cls(
            path=home,
            database_url=home_database_url(home, database_url, env),
            amqp_url=amqp_url or env.get(ENV_AMQP_URL) or DEFAULT_AMQP_URL,
            vhost=vhost or env.get(ENV_VHOST) or read_vhost(home),
            amqp_password_file=Path(password_file) if password_file else home / PASSWORD_FILE,
            case_dir=chosen_case_dir or home / INBOX_DIR,
            case_system_spec=case_system or env.get(ENV_CASE_SYSTEM) or None,
            status_file=Path(status_file) if status_file else None,
        )

    # --- identity -------------------------------------------------------------

    def keys(self) -> ParticipantKeys:
        """The participant's card and private keys (loaded once)."""
        with self._lock:
            if self._keys is None:
                self._keys = load_keys(self.path)
            return self._keys

    @property
    def participant_id(self) -> str:
        """The participant's id, from its card."""
        return self.keys().card.id

    def sender(self) -> Sender:
        """The newest signing key valid now that the installed directory lists."""
        return self.keys().sender(datetime.now(UTC), self.directory())

    def recipient(self) -> Recipient:
        """The decryption identity."""
        return Recipient(self.participant_id, self.keys().decryption)

    def directory(self) -> Directory:
        """The installed directory, reloaded (and verified again) when its file changed.

        A file older than the directory held, or than the home's serial floor,
        is refused: a running process keeps the directory it holds.
        """
        target = self.path / DIRECTORY_FILE
        try:
            status = target.stat()
        except OSError as e:
            raise ConfigError(
                f"{target} is missing: install the signed directory with "
                "`trm directory install FILE --home HOME`"
            ) from e
        stamp = (status.st_ino, status.st_mtime_ns, status.st_size)
        with self._lock:
            if self._directory is None or stamp != self._directory_stamp:
                self._directory = reload_home_directory(self.path, self._directory)
                self._directory_stamp = stamp
            return self._directory

    # --- services -------------------------------------------------------------

    def amqp_settings(self) -> AmqpSettings:
        """How to log in to RabbitMQ as this participant; ConfigError without a password."""
        password = _read_secret(self.amqp_password_file, ENV_AMQP_PASSWORD_FILE)
        return AmqpSettings.from_url(
            self.amqp_url, vhost=self.vhost, username=self.participant_id, password=password
        )

    def open_database(self) -> Engine:
        """An engine on the participant's database, migrated to the newest schema."""
        return open_database(self.database_url)

    def case_system(self) -> CaseSystem:
        """Where decrypted payloads go: the configured case system, else the case folder."""
        if self.case_system_spec is None:
            return FileCaseSystem(self.case_dir)
        return load_case_system(self.case_system_spec, self.path)

    # --- the adapter's status ---------------------------------------------------

    @property
    def status_path(self) -> Path:
        """Where the adapter records its state: ``TRM_STATUS_FILE``, else in the home."""
        return self.status_file or self.path / STATUS_FILE

    def write_status(self, status: dict[str, Any]) -> None:
        """Replace the status file with `status` (JSON, mode 0600); OSError if it cannot."""
        target = self.status_path
        tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(status, handle, sort_keys=True)
            tmp.replace(target)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    def read_status(self) -> dict[str, Any] | None:
        """The status the adapter last recorded; None if it never did here.

        ConfigError if the file cannot be read or is not a status.
        """
        try:
            text = self.status_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return None
        except OSError as e:
            raise ConfigError(
                f"cannot read the adapter status {self.status_path}: {e.strerror}"
            ) from e
        try:
            status = json.loads(text)
        except ValueError as e:
            raise ConfigError(f"the adapter status {self.status_path} is not JSON") from e
        if not isinstance(status, dict) or not isinstance(status.get("state"), str):
            raise ConfigError(f"the adapter status {self.status_path} names no state")
        return status


LOCAL_DOWN = "local_down"
"""The adapter's state while its database or case system cannot apply deliveries."""


def check_health(home: Home) -> list[tuple[str, bool, str]]:
    """(check, passed, detail) for keys, directory, database, broker login and the adapter.

    Each check runs even when an earlier one failed, so one run names every
    problem; a check's detail is the error's message, never a secret. The
    adapter check reads what a running adapter recorded (`Home.status_path`):
    it fails while the adapter's local side is down, and passes when no
    adapter ever ran on this home.
    """
    from broker.transport import open_connection

    results: list[tuple[str, bool, str]] = []

    def attempt(name: str, check: Callable[[], str]) -> None:
        try:
            results.append((name, True, check()))
        except TrmError as e:
            results.append((name, False, f"{e.reason}: {e}"))

    def keys() -> str:
        found = home.keys()
        return f"{found.card.id}: {len(found.signing)} signing, {len(found.decryption)} decryption"

    def directory() -> str:
        return f"serial {home.directory().serial}"

    def database() -> str:
        engine = home.open_database()
        try:
            with storage_errors("reaching the database"), engine.connect() as conn:
                conn.execute(sa.text("SELECT 1"))
        finally:
            engine.dispose()
        return sa.make_url(home.database_url).render_as_string(hide_password=True)

    def broker() -> str:
        settings = home.amqp_settings()
        connection = open_connection(settings)
        connection.close()
        return f"logged in as {settings.describe()}"

    def adapter() -> str:
        status = home.read_status()
        if status is None:
            return f"no adapter has run here (no {home.status_path})"
        state = status["state"]
        pid = status.get("pid")
        if state == LOCAL_DOWN:
            raise LocalUnavailable(
                f"the adapter (pid {pid}) cannot apply deliveries since {status.get('since')}: "
                f"{status.get('cause')}; {status.get('attempts')} tries, the last at "
                f"{status.get('updated_at')}. The deliveries wait in the queue; fix the "
                "database or case system and the adapter takes them by itself"
            )
        publishing = status.get("publishing")
        if state != "stopped" and isinstance(publishing, dict):
            raise BrokerUnavailable(
                f"the adapter (pid {pid}) cannot publish since {publishing.get('since')}: "
                f"{publishing.get('cause')}. The envelopes wait in the outbox (trm send keeps "
                "queueing) and go once RabbitMQ confirms them again"
            )
        return f"{state} since {status.get('since')} (pid {pid})"

    attempt("keys", keys)
    attempt("directory", directory)
    attempt("database", database)
    attempt("broker", broker)
    attempt("adapter", adapter)
    return results
