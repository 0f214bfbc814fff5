"""A local trm network on a real RabbitMQ: for tests, the demo, chaos campaigns, benchmarks.

`create_network` builds, under one root folder, a directory authority, a home
per participant (keys, pinned authority key, the signed directory, RabbitMQ
password) and provisions a vhost for them. Adapters and other trm commands run
as real processes (``python -m trm ...``) whose output is appended to
``ROOT/logs/<name>.log``; `LocalNetwork.send` seals and queues in-process,
exactly as ``trm send`` does.

RabbitMQ users are global to the broker and named by participant id, so two
networks with the same participant ids share users. Each participant's
password is therefore derived from the administrator's credentials and the
id (the same in every network on one broker), and `LocalNetwork.close` deletes
a user only once no other vhost grants it permissions. That check and delete,
and provisioning's find-and-grant, hold the machine's lock on the broker's
users (`ManagementClient.users_held`), so networks on one machine may be
created and closed at once; networks on other machines sharing the broker
should use other participant ids.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit, urlunsplit
from uuid import UUID

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from adapters.home import Home
from adapters.sending import send_message
from broker._crypto import Suite
from broker.database import inbox_table, open_database, storage_errors
from broker.directory import (
    DIRECTORY_FILE,
    DirectoryBody,
    Role,
    install_directory,
    sign_directory,
)
from broker.envelope import SealedEnvelope
from broker.errors import ConfigError
from broker.keys import init_authority, init_participant, load_authority, pin_authority
from broker.management import DEFAULT_MANAGEMENT_URL, ManagementClient
from broker.outbox import Outbox
from broker.topology import PASSWORD_FILE, provision, write_vhost
from broker.transport import DEFAULT_AMQP_URL
from schemas.base import Message, MessageKind
from schemas.examples import example

DEMO_PARTICIPANTS: tuple[tuple[str, Role, str, str | None], ...] = (
    ("iom-kz", Role.MISSION, "KZ", None),
    ("iom-uz", Role.MISSION, "UZ", None),
    ("ngo-uz-istiqbolli-avlod", Role.NGO, "UZ", "iom-uz"),
    ("ngo-kz-rodnik", Role.NGO, "KZ", "iom-kz"),
    ("routing", Role.ROUTING, "AT", None),
    ("auditor", Role.AUDITOR, "AT", None),
)
"""(id, role, country, parent) of the Kazakhstan-to-Uzbekistan return and referral stories."""

POLL_SECONDS = 0.05
_ENV_CLEARED = (
    "TRM_DATABASE_URL",
    "TRM_DATABASE_PASSWORD_FILE",
    "TRM_AMQP_PASSWORD_FILE",
    "TRM_CASE_DIR",
    "TRM_CASE_SYSTEM",
    "TRM_STATUS_FILE",
    "TRM_FAULTS",
    "TRM_FAULT_SEED",
)


def _host_url(amqp_url: str) -> str:
    """The AMQP URL(s) without credentials or vhost: adapters log in as themselves."""
    hosts = []
    for address in amqp_url.split(","):
        parts = urlsplit(address.strip())
        netloc = parts.hostname or "127.0.0.1"
        if parts.port:
            netloc += f":{parts.port}"
        hosts.append(urlunsplit((parts.scheme, netloc, "/", "", "")))
    return ",".join(hosts)


def local_password(management_url: str, participant_id: str) -> str:
    """The RabbitMQ password of `participant_id` on a local network: the same in every network.

    Derived from the administrator's URL (whoever knows it controls the broker
    anyway), so concurrent networks never change each other's passwords.
    """
    digest = hashlib.sha256(f"trm-localnet\x00{management_url}\x00{participant_id}".encode())
    return digest.hexdigest()


@dataclass
class LocalNetwork:
    """Homes, a vhost and the processes started on them; `close` removes the vhost."""

    root: Path
    vhost: str
    amqp_url: str
    management_url: str
    authority: Path
    directory_file: Path
    participants: dict[str, Path]
    database_urls: dict[str, str] = field(default_factory=dict)
    sites: dict[str, tuple[str, str]] = field(default_factory=dict)
    """Participants on another broker than ``amqp_url``: (AMQP URL, management URL)."""
    _processes: list[subprocess.Popen[bytes]] = field(default_factory=list, repr=False)
    _engines: dict[str, Engine] = field(default_factory=dict, repr=False)
    _homes: dict[str, Home] = field(default_factory=dict, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    # --- where things are -------------------------------------------------------

    def home(self, participant_id: str) -> Path:
        """The home folder of `participant_id`."""
        try:
            return self.participants[participant_id]
        except KeyError as e:
            raise ConfigError(f"{participant_id!r} is not in this local network") from e

    def database_url(self, participant_id: str) -> str:
        """The database URL of `participant_id`'s adapter."""
        return self.database_urls.get(participant_id) or (
            f"sqlite:///{self.home(participant_id) / 'trm.db'}"
        )

    def settings(self, participant_id: str, database_url: str | None = None) -> Home:
        """`participant_id`'s `Home` with this network's settings (its own environment ignored)."""
        return Home.resolve(
            self.home(participant_id),
            database_url=database_url or self.database_url(participant_id),
            amqp_url=_host_url(self.broker_of(participant_id)),
            vhost=self.vhost,
            environ={},
        )

    def broker_of(self, participant_id: str | None) -> str:
        """The AMQP URL(s) of the broker `participant_id` connects to."""
        site = self.sites.get(participant_id or "")
        return site[0] if site else self.amqp_url

    def environment(
        self,
        participant_id: str | None = None,
        env: Mapping[str, str] | None = None,
        database_url: str | None = None,
    ) -> dict[str, str]:
        """The environment of a process on this network (as `participant_id`, if given)."""
        merged = {k: v for k, v in os.environ.items() if k not in _ENV_CLEARED}
        merged["TRM_AMQP_URL"] = _host_url(self.broker_of(participant_id))
        merged["TRM_AMQP_VHOST"] = self.vhost
        site = self.sites.get(participant_id or "")
        merged["TRM_AMQP_MANAGEMENT_URL"] = site[1] if site else self.management_url
        merged["PYTHONUNBUFFERED"] = "1"
        if participant_id is not None:
            merged["TRM_DATABASE_URL"] = database_url or self.database_url(participant_id)
        merged.update(env or {})
        return merged

    # --- processes ----------------------------------------------------------------

    def start_adapter(
        self,
        participant_id: str,
        *,
        env: Mapping[str, str] | None = None,
        database_url: str | None = None,
    ) -> subprocess.Popen[bytes]:
        """Start ``trm adapter run`` for `participant_id`; output appended to logs/<id>.log."""
        return self._spawn(
            ["adapter", "run", "--home", str(self.home(participant_id))],
            participant_id,
            self.environment(participant_id, env, database_url),
        )

    def start_process(
        self, args: Sequence[str], log_name: str, env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        """Start ``python -m trm ARGS`` on this network; output appended to logs/<log_name>.log."""
        return self._spawn(list(args), log_name, self.environment(None, env))

    def _spawn(
        self, args: list[str], log_name: str, env: Mapping[str, str]
    ) -> subprocess.Popen[bytes]:
        logs = self.root / "logs"
        logs.mkdir(exist_ok=True)
        with (logs / f"{log_name}.log").open("ab") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "trm", *args],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=dict(env),
                cwd=self.root,
            )
        with self._lock:
            self._processes.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 20) -> int:
        """SIGTERM, wait up to `timeout` seconds, then SIGKILL; the exit code."""
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                return proc.wait(timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
        return proc.wait()

    def stop_all(self, timeout: float = 20) -> list[int]:
        """Stop every process started here (see `stop`); their exit codes, in start order."""
        with self._lock:
            processes, self._processes = list(self._processes), []
        return [self.stop(proc, timeout) for proc in processes]

    def kill(self, proc: subprocess.Popen[bytes]) -> None:
        """SIGKILL the process and reap it."""
        if proc.poll() is None:
            proc.kill()
        proc.wait()

    # --- sending and looking ------------------------------------------------------------

    def engine(self, participant_id: str) -> Engine:
        """An engine on `participant_id`'s database (opened once, migrated)."""
        with self._lock:
            engine = self._engines.get(participant_id)
            if engine is None:
                engine = open_database(self.database_url(participant_id))
                self._engines[participant_id] = engine
            return engine

    def _home_of(self, participant_id: str) -> Home:
        with self._lock:
            home = self._homes.get(participant_id)
            if home is None:
                home = self.settings(participant_id)
                self._homes[participant_id] = home
            return home

    def send(
        self,
        sender: str,
        kind: MessageKind,
        *,
        to: Sequence[str],
        case: str,
        message: Message | None = None,
        reply_to: UUID | str | None = None,
    ) -> SealedEnvelope:
        """Seal and queue a message from `sender` (the kind's example unless `message`)."""
        return send_message(
            self._home_of(sender),
            message if message is not None else example(kind),
            to=to,
            case=case,
            reply_to=reply_to,
            engine=self.engine(sender),
        )

    def inbox_ids(self, participant_id: str) -> set[str]:
        """Ids of every envelope `participant_id` has applied."""
        with storage_errors("reading the inbox"), self.engine(participant_id).connect() as conn:
            return set(conn.execute(sa.select(inbox_table.c.envelope_id)).scalars())

    def delivered_files(self, participant_id: str) -> list[Path]:
        """The files the default case system wrote for `participant_id`, sorted."""
        return sorted(self._home_of(participant_id).case_dir.glob("*.json"))

    def delivered_documents(self, participant_id: str) -> list[dict[str, Any]]:
        """The documents of `delivered_files`, parsed; one erased meanwhile is not there."""
        documents = []
        for path in self.delivered_files(participant_id):
            try:
                text = path.read_text(encoding="utf-8")
            except FileNotFoundError:
                continue  # an erasure removed it after the folder was listed
            documents.append(json.loads(text))
        return documents

    def outbox_pending(self, participant_id: str) -> int:
        """How many of `participant_id`'s envelopes wait for a broker confirm."""
        return Outbox(self.engine(participant_id)).status().pending

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        """Poll `condition` every 0.05 s until true; TimeoutError naming `what` after `timeout`."""
        deadline = time.monotonic() + timeout
        pause = threading.Event()
        while not condition():
            if time.monotonic() >= deadline:
                raise TimeoutError(f"timed out after {timeout} s waiting for {what}")
            pause.wait(POLL_SECONDS)

    # --- teardown -----------------------------------------------------------------------

    def close(self, *, keep_vhost: bool = False) -> None:
        """Stop every process started here, close databases, delete the vhost and its users.

        `keep_vhost` leaves the vhost, its queues and users for inspection.
        """
        with self._lock:
            processes, self._processes = list(self._processes), []
            engines, self._engines = list(self._engines.values()), {}
        for proc in processes:
            self.stop(proc)
        for engine in engines:
            engine.dispose()
        if keep_vhost:
            return
        managements = dict.fromkeys([self.management_url, *(m for _a, m in self.sites.values())])
        for management_url in managements:
            client = ManagementClient(management_url)
            if client.vhost_exists(self.vhost):
                client.delete_vhost(self.vhost)
            for user in self.participants:
                client.delete_user_if_unused(user)

    def add_site(
        self,
        participants: Sequence[str],
        *,
        amqp_url: str,
        management_url: str,
        routing_queue: bool = False,
    ) -> None:
        """Provision this network's vhost on another broker for `participants`, who use it.

        Their users get the passwords their homes hold. The brokers are linked
        by `broker.federation`, not here.
        """
        passwords = {
            p: (self.home(p) / PASSWORD_FILE).read_text(encoding="utf-8").strip()
            for p in participants
        }
        roles = self.directory_roles()
        provision(
            ManagementClient(management_url),
            amqp_url,
            self.vhost,
            [(p, roles[p]) for p in participants],
            passwords=passwords,
            routing_queue=routing_queue,
        )
        for participant_id in participants:
            self.sites[participant_id] = (amqp_url, management_url)

    def directory_roles(self) -> dict[str, str]:
        """Each participant's role, from the network's directory."""
        directory = self._home_of(next(iter(self.participants))).directory()
        return {card.id: str(card.role) for card in directory.participants()}


def create_network(
    root: Path,
    participants: Sequence[tuple[str, Role, str, str | None]] = DEMO_PARTICIPANTS,
    *,
    amqp_url: str = DEFAULT_AMQP_URL,
    management_url: str = DEFAULT_MANAGEMENT_URL,
    vhost: str | None = None,
    database_urls: Mapping[str, str] | None = None,
    suite: Suite = Suite.MLKEM768_X25519,
    witnesses: Sequence[str] = (),
    quorum: int = 0,
    provisioned: Sequence[str] | None = None,
) -> LocalNetwork:
    """Build a network under `root` (wiped first) and provision it on a vhost.

    `witnesses` (missions or auditors) and `quorum` go into the directory:
    their adapters then cosign the routing log's checkpoints.

    `vhost` None makes a fresh unique one; a named vhost that exists is
    deleted and created again. `database_urls` gives some participants
    another database than ``HOME/trm.db``. Homes are ``ROOT/<id>``, beside
    ``ROOT/authority``, ``ROOT/logs`` and ``ROOT/directory.json``.
    `provisioned` names the participants whose users and queues go on this
    broker (all when None; the others on another, see `LocalNetwork.add_site`);
    ``trm.routing`` goes where the routing participant is.
    """
    clashing = {p for p, *_ in participants} & {"authority", "logs"}
    if clashing:
        raise ConfigError(f"participant ids {sorted(clashing)} clash with folders of the network")
    root = Path(root)
    if root.exists():
        shutil.rmtree(root)
    root.mkdir(parents=True)
    now = datetime.now(UTC)
    authority_dir = root / "authority"
    init_authority(authority_dir)
    homes: dict[str, Path] = {}
    cards = []
    for participant_id, role, country, parent in participants:
        home = root / participant_id
        cards.append(
            init_participant(
                home,
                participant_id=participant_id,
                role=role,
                country=country,
                parent=parent,
                suite=suite,
                now=now,
            )
        )
        homes[participant_id] = home
    body = DirectoryBody(
        serial=1,
        issued_at=now,
        participants=tuple(cards),
        witnesses=tuple(witnesses),
        quorum=quorum,
    )
    signed = sign_directory(body, load_authority(authority_dir))
    directory_file = root / DIRECTORY_FILE
    directory_file.write_bytes(signed)
    for home in homes.values():
        pin_authority(home, authority_dir / "authority.pub")
        install_directory(signed, home)
    chosen_vhost = vhost or f"trm-net-{uuid.uuid4().hex[:12]}"
    client = ManagementClient(management_url)
    if client.vhost_exists(chosen_vhost):
        client.delete_vhost(chosen_vhost)
    passwords = {pid: local_password(management_url, pid) for pid in homes}
    here = [(p, str(role)) for p, role, _c, _parent in participants]
    if provisioned is not None:
        here = [(p, role) for p, role in here if p in provisioned]
    provision(
        client,
        amqp_url,
        chosen_vhost,
        here,
        passwords=passwords,
        routing_queue=provisioned is None or any(role == Role.ROUTING for _p, role in here),
    )
    for participant_id, home in homes.items():
        _write_password(home / PASSWORD_FILE, passwords[participant_id])
        write_vhost(home, chosen_vhost)
    return LocalNetwork(
        root=root,
        vhost=chosen_vhost,
        amqp_url=amqp_url,
        management_url=management_url,
        authority=authority_dir,
        directory_file=directory_file,
        participants=homes,
        database_urls=dict(database_urls or {}),
    )


def _write_password(path: Path, secret: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    handle: IO[str]
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(secret + "\n")
