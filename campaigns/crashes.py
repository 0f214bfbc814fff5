"""Campaigns 1-3: consumer crashes, broker restarts and relay crashes under load.

Each run builds a scratch network (iom-kz opens cases with iom-uz and keeps
sending on them, `flow_message`; the routing service logs everything), sends
its messages from a thread while faults are injected, waits until everything
is applied and every receipt is back, stops the processes and hands the
databases to `campaigns.checker`.

- **consumer crashes**: the receiving adapter dies by SIGKILL at its fault
  points ``inbox.before_commit`` / ``inbox.after_commit`` (``TRM_FAULTS``)
  and by external SIGKILLs at random moments, and is restarted each time.
- **broker restarts**: ``rabbitmqctl stop_app`` / ``start_app`` during the
  run, and once a hard kill of the Erlang VM and a cold start; RabbitMQ is
  always left running.
- **relay crashes**: the sending adapter dies at ``relay.after_publish`` /
  ``relay.after_confirm`` and by external SIGKILLs, and is restarted.
"""

from __future__ import annotations

import random
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import sqlalchemy as sa

from campaigns.checker import RECEIPT_KIND, Party, Status, check, quarantine_rows
from campaigns.network import (
    KZ,
    ROUTING,
    UZ,
    Services,
    flow_message,
    scratch_network,
    sqlite_synchronous,
)
from campaigns.report import Row
from trm.localnet import LocalNetwork

CASES = 50
"""Messages are spread over this many case references (`flow_message`)."""
RABBITMQ_BOOT_SECONDS = 180
BATCH_FAULT = 0.1
"""Probability of a kill at each inbox fault point, passed once per applied batch."""
RESTART_SECONDS = 2.5
"""About how long an adapter takes to die, be noticed and start again."""
BROKER_EVENT_SECONDS = 10.0
"""About how long one RabbitMQ restart takes from stop to accepting connections again."""
_PENDING = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"


@dataclass
class Supervised:
    """One adapter process, restarted whenever it dies; counts deaths and their causes."""

    net: LocalNetwork
    participant: str
    faults: str = ""
    kill_target: int = 0
    deaths: int = 0
    external_kills: int = 0
    seed: int = 0
    proc: subprocess.Popen[bytes] | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def start(self) -> None:
        """Start the adapter; with faults while deaths are below the target."""
        env: dict[str, str] = {}
        if self.faults and self.deaths < self.kill_target:
            self.seed += 1
            env = {"TRM_FAULTS": self.faults, "TRM_FAULT_SEED": f"{self.participant}-{self.seed}"}
        self.proc = self.net.start_adapter(self.participant, env=env)

    def tend(self) -> None:
        """Restart the adapter if it died."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is not None:
                self.deaths += 1
                self.start()

    def kill(self) -> None:
        """SIGKILL the adapter from outside (it is restarted by the next `tend`)."""
        with self._lock:
            if self.proc is not None and self.proc.poll() is None:
                self.net.kill(self.proc)
                self.external_kills += 1
                self.deaths += 1
                self.start()

    def stop(self) -> None:
        """Stop the adapter cleanly."""
        with self._lock:
            if self.proc is not None:
                self.net.stop(self.proc)


def _count(url: str, query: str) -> int:
    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            if query.split(" FROM ", 1)[1].split()[0] not in sa.inspect(conn).get_table_names():
                return 0
            return int(conn.execute(sa.text(query)).scalar_one())
    finally:
        engine.dispose()


class _Run:
    """The network, the processes and the sender thread of one delivery campaign."""

    def __init__(self, net: LocalNetwork, messages: int, seed: int) -> None:
        self.net = net
        self.messages = messages
        self.rng = random.Random(seed)
        self.sent = 0
        self.send_error: BaseException | None = None
        self.routing = net.start_process(
            ["routing", "run", "--home", str(net.home(ROUTING)), "--deadline-poll", "3600"],
            "routing",
            env={"TRM_DATABASE_URL": net.database_url(ROUTING)},
        )

    def sender(self, pace: float = 0.0) -> threading.Thread:
        """Send every message from a thread, message i no earlier than i * `pace` seconds in.

        A schedule rather than a pause after each send: the flow spans the
        faults without the sending time adding to it.
        """

        def body() -> None:
            start = time.monotonic()
            try:
                for i in range(self.messages):
                    ahead = start + i * pace - time.monotonic()
                    if ahead > 0:
                        time.sleep(ahead)
                    kind, case = flow_message(i, CASES)
                    self.net.send(KZ, kind, to=[UZ], case=case)
                    self.sent += 1
            except BaseException as e:
                self.send_error = e

        thread = threading.Thread(target=body, name="campaign-sender", daemon=True)
        thread.start()
        return thread

    def settled(self) -> bool:
        """Everything sent, applied, receipted and logged, and both outboxes drained.

        The recipient's outbox too: a redelivery absorbed as a duplicate queues
        its receipt again, which is unsent until the recipient's relay runs.
        """
        if self.send_error is not None:
            raise self.send_error
        n = self.messages
        unsent = "SELECT count(*) FROM outbox WHERE sent_at IS NULL"
        return (
            self.sent == n
            and _count(self.net.database_url(UZ), "SELECT count(*) FROM inbox") >= n
            and _count(self.net.database_url(KZ), "SELECT count(*) FROM inbox") >= n
            and _count(self.net.database_url(KZ), unsent) == 0
            and _count(self.net.database_url(UZ), unsent) == 0
            and _count(self.net.database_url(ROUTING), "SELECT count(*) FROM log_entries") >= 2 * n
        )

    def wait(
        self, timeout: float, tend: Callable[[], None], faulted: Callable[[], bool] = lambda: True
    ) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            tend()
            if faulted() and self.settled():
                return True
            time.sleep(0.5)
        return False

    def stop(self) -> None:
        self.net.stop(self.routing)

    def verdict_row(self, name: str, database: str, seconds: float, settled: bool) -> Row:
        net = self.net
        parties = [
            Party(KZ, net.database_url(KZ)),
            Party(UZ, net.database_url(UZ), files=net.settings(UZ).case_dir),
            Party(ROUTING, net.database_url(ROUTING)),
        ]
        verdict = check(parties, routing_url=net.database_url(ROUTING), routing_participant=ROUTING)
        row = Row(name, database, messages=verdict.messages())
        row.ok = verdict.count(Status.OK)
        row.lost = verdict.count(Status.LOST) + (self.messages - row.messages)
        row.duplicated = verdict.count(Status.DUPLICATED)
        receipts_ok = verdict.count(Status.OK, receipts=True)
        quarantined = quarantine_rows(net.database_url(UZ)) + quarantine_rows(net.database_url(KZ))
        row.quarantined = len(quarantined)
        row.add_reasons(q.reason for q in quarantined)
        row.figures.update(
            redeliveries_absorbed=verdict.redeliveries,
            outbox_resends=verdict.resent,
            receipts_ok=f"{receipts_ok}/{verdict.messages(receipts=True)}",
            log_entries=verdict.log_entries,
            unexpected=len(verdict.unexpected),
            seconds=round(seconds, 1),
        )
        row.must(f"all {self.messages} messages sent, applied and receipted in time", settled)
        row.must("every message was sent", row.messages == self.messages)
        row.must("lost 0", row.lost == 0)
        row.must("duplicate effects 0", row.duplicated == 0)
        row.must("no unexpected effects", not verdict.unexpected)
        row.must("every outbox drained", verdict.pending == 0)
        row.must("no valid envelope quarantined", not quarantined)
        row.must(
            "every receipt delivered once",
            receipts_ok == verdict.messages(receipts=True) == self.messages,
        )
        synchronous = sqlite_synchronous(net.database_url(UZ))
        if synchronous is not None:
            row.figures["sqlite_synchronous"] = synchronous
            row.must("SQLite runs with synchronous=FULL", synchronous == "FULL")
        kinds = {k for k in verdict.kinds.values() if k != RECEIPT_KIND}
        row.figures["kinds"] = ",".join(sorted(kinds))
        return row


def _timeout(messages: int) -> float:
    return 300 + messages * 0.12


def run_consumer_crashes(
    root: Path, database: str, services: Services, *, messages: int, kills: int, seed: int = 1
) -> Row:
    """Campaign 1: the receiving adapter SIGKILLed `kills` times while `messages` flow."""
    # The inbox applies waiting deliveries in batches: each point is passed once per batch.
    faults = f"inbox.before_commit:{BATCH_FAULT},inbox.after_commit:{BATCH_FAULT}"
    with scratch_network(root, database, [KZ, UZ, ROUTING], services) as net:
        run = _Run(net, messages, seed)
        sender = Supervised(net, KZ)
        receiver = Supervised(net, UZ, faults=faults, kill_target=kills)
        sender.start()
        receiver.start()
        started = time.monotonic()
        # Paced so that deliveries keep arriving across every kill.
        run.sender(pace=RESTART_SECONDS * kills / max(messages, 1))
        external_target = kills // 3

        def tend() -> None:
            receiver.tend()
            sender.tend()
            # Past the planned share, external kills make up what the fault points missed.
            behind = receiver.external_kills < external_target or run.sent == messages
            due = receiver.deaths < kills and behind
            if due and run.rng.random() < 0.25:
                # A random moment: anywhere in opening, applying, committing or acking.
                time.sleep(run.rng.uniform(0.0, 0.5))
                receiver.kill()

        settled = run.wait(_timeout(messages), tend, lambda: receiver.deaths >= kills)
        seconds = time.monotonic() - started
        receiver.stop()
        sender.stop()
        run.stop()
        row = run.verdict_row("consumer_crashes", database, seconds, settled)
        row.faults = receiver.deaths
        row.figures["kills_at_fault_points"] = receiver.deaths - receiver.external_kills
        row.figures["external_sigkills"] = receiver.external_kills
        row.must(f"the receiver was killed at least {kills} times", receiver.deaths >= kills)
        return row


def run_relay_crashes(
    root: Path, database: str, services: Services, *, messages: int, kills: int, seed: int = 3
) -> Row:
    """Campaign 3: the sending adapter (its relay) SIGKILLed `kills` times."""
    faults = "relay.after_publish:0.15,relay.after_confirm:0.15"
    with scratch_network(root, database, [KZ, UZ, ROUTING], services) as net:
        run = _Run(net, messages, seed)
        sender = Supervised(net, KZ, faults=faults, kill_target=kills)
        receiver = Supervised(net, UZ)
        receiver.start()
        sender.start()
        started = time.monotonic()
        # Paced so that the relay has many batches to die in.
        run.sender(pace=RESTART_SECONDS * kills / max(messages, 1))
        external_target = kills // 3

        def tend() -> None:
            receiver.tend()
            sender.tend()
            # Past the planned share, external kills make up what the fault points missed.
            behind = sender.external_kills < external_target or run.sent == messages
            due = sender.deaths < kills and behind
            if due and run.rng.random() < 0.2:
                time.sleep(run.rng.uniform(0.0, 0.5))
                sender.kill()

        settled = run.wait(_timeout(messages), tend, lambda: sender.deaths >= kills)
        seconds = time.monotonic() - started
        sender.stop()
        receiver.stop()
        run.stop()
        row = run.verdict_row("relay_crashes", database, seconds, settled)
        row.faults = sender.deaths
        row.figures["kills_at_fault_points"] = sender.deaths - sender.external_kills
        row.figures["external_sigkills"] = sender.external_kills
        row.figures["broker_duplicates_absorbed"] = row.figures["redeliveries_absorbed"]
        row.must(f"the relay was killed at least {kills} times", sender.deaths >= kills)
        return row


# --- the broker ----------------------------------------------------------------------------


def _ctl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def _port_open(port: int = 5672) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


def _await_startup() -> None:
    seconds = RABBITMQ_BOOT_SECONDS
    _ctl("await_startup", "--timeout", str(seconds), timeout=seconds + 10)


def ensure_rabbitmq_running() -> bool:
    """Start RabbitMQ's application (or the whole node) if it is down; whether it runs."""
    if _ctl("await_startup", "--timeout", "5", timeout=30).returncode != 0:
        if _ctl("start_app").returncode != 0:
            subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, check=False)
        _ctl(
            "await_startup", "--timeout", str(RABBITMQ_BOOT_SECONDS), timeout=RABBITMQ_BOOT_SECONDS
        )
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if _port_open(5672) and _port_open(15672):
            return True
        time.sleep(0.5)
    return False


def restart_app(down_seconds: float) -> None:
    """``rabbitmqctl stop_app``, wait, ``start_app``."""
    try:
        _ctl("stop_app")
        time.sleep(down_seconds)
    finally:
        _ctl("start_app")
        _ctl(
            "await_startup", "--timeout", str(RABBITMQ_BOOT_SECONDS), timeout=RABBITMQ_BOOT_SECONDS
        )


def hard_kill() -> None:
    """kill -9 of the Erlang VM, then a cold start with ``rabbitmq-server -detached``."""
    found = _ctl("eval", "list_to_integer(os:getpid()).")
    pid = int(found.stdout.strip())
    try:
        subprocess.run(["kill", "-9", str(pid)], check=True)
        deadline = time.monotonic() + 30
        while _port_open(5672) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        subprocess.run(["rabbitmq-server", "-detached"], capture_output=True, check=False)
        _ctl(
            "await_startup", "--timeout", str(RABBITMQ_BOOT_SECONDS), timeout=RABBITMQ_BOOT_SECONDS
        )


def run_broker_restarts(
    root: Path,
    database: str,
    services: Services,
    *,
    messages: int,
    restarts: int,
    hard_kills: int,
    seed: int = 2,
) -> Row:
    """Campaign 2: RabbitMQ restarted `restarts` times and hard-killed `hard_kills` times."""
    done = {"restarts": 0, "hard_kills": 0}
    try:
        with scratch_network(root, database, [KZ, UZ, ROUTING], services) as net:
            run = _Run(net, messages, seed)
            sender, receiver = Supervised(net, KZ), Supervised(net, UZ)
            sender.start()
            receiver.start()
            started = time.monotonic()
            # Paced so the flow spans every restart; the outbox holds what the broker cannot take.
            events = restarts + hard_kills
            run.sender(pace=BROKER_EVENT_SECONDS * events / max(messages, 1))
            plan = ["restart"] * restarts + ["hard_kill"] * hard_kills
            run.rng.shuffle(plan)

            def tend() -> None:
                receiver.tend()
                sender.tend()
                happened = done["restarts"] + done["hard_kills"]
                # Event k is due once k+1 shares of (events + 1) of the messages were sent.
                due = messages * (happened + 1) / (events + 1)
                if happened < events and run.sent >= due:
                    if plan[happened] == "restart":
                        restart_app(run.rng.uniform(2.0, 5.0))
                        done["restarts"] += 1
                    else:
                        hard_kill()
                        done["hard_kills"] += 1

            settled = run.wait(
                _timeout(messages) + 60 * events,
                tend,
                lambda: done["restarts"] + done["hard_kills"] == events,
            )
            seconds = time.monotonic() - started
            sender.stop()
            receiver.stop()
            run.stop()
            row = run.verdict_row("broker_restarts", database, seconds, settled)
    finally:
        running = ensure_rabbitmq_running()
    row.faults = done["restarts"] + done["hard_kills"]
    row.figures["stop_start_app"] = done["restarts"]
    row.figures["hard_kills"] = done["hard_kills"]
    row.figures["adapter_deaths"] = sender.deaths + receiver.deaths
    row.must(
        f"RabbitMQ was restarted {restarts} times and hard-killed {hard_kills} times",
        done == {"restarts": restarts, "hard_kills": hard_kills},
    )
    row.must("RabbitMQ is running afterwards", running)
    return row
