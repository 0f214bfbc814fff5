"""The three stories end to end on the local RabbitMQ: what `trm demo` runs.

One return case goes from the Kazakhstan mission to the Uzbekistan mission
and its NGO through every stage, each handoff sent by a real adapter process
and watched by the routing service. Then a referral: a Kazakh NGO refers a
person to the Uzbek NGO, which accepts and starts the service, until the
person withdraws consent and asks for their data to be deleted: every party
halts the case and erases its payloads, and a later send on it is refused.
Both missions are witnesses (quorum 2): their adapters cosign each of the
routing log's checkpoints. Last, the audit log is exported, verified (with
the quorum) and replayed as an auditor would, and the return's timeline
printed.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO, TypeVar

import sqlalchemy as sa

from adapters.sending import confirm_reception, report_service, withdraw_consent
from broker.database import erasures_table, receipts_table, storage_errors
from broker.directory import load_home_directory
from broker.envelope import SealedEnvelope
from broker.errors import AuditError, ConfigError, ProtocolViolation, TrmError
from broker.topology import ROUTING_QUEUE, inbox_queue, queue_consumers, queue_depths, witness_queue
from broker.transport import AmqpSettings
from schemas.base import MessageKind
from schemas.examples import EXAMPLE_CASE, example, sharing_with
from services.auditlog import AuditLog
from services.casestore import CaseStore
from services.cosignature import check_cosignatures
from trm import logs
from trm.localnet import DEMO_PARTICIPANTS, LocalNetwork, create_network

KZ, UZ, NGO, ROUTING = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing"
NGO_KZ = "ngo-kz-rodnik"
ADAPTERS = (KZ, UZ, NGO, NGO_KZ)
WITNESSES = (KZ, UZ)
QUORUM = 2
CHECKPOINT_SECONDS = 1.0
"""The routing service's checkpoint interval in the demo, so that witnesses see it grow."""
REFERRAL_CASE = f"{NGO_KZ}.REF-2026-0031"
"""The referral's case reference, owned by the referring NGO."""
DEMO_VHOST = "trm-demo"
MARKER = ".trm-demo"
"""Left in the work folder so a later run knows the folder is the demo's to wipe."""
STEP_TIMEOUT = 60.0

T = TypeVar("T")


@dataclass(frozen=True)
class Step:
    """One handoff of the story: who sends which kind to whom, and the stage it leads to."""

    kind: MessageKind
    sender: str
    recipients: tuple[str, ...]
    stage: str
    story: str


STEPS: tuple[Step, ...] = (
    Step(
        MessageKind.RETURN_REQUEST,
        KZ,
        (UZ, NGO),
        "requested",
        "asks Uzbekistan to take the person home",
    ),
    Step(
        MessageKind.RETURN_ACCEPTED, UZ, (KZ, NGO), "accepted", "accepts, names the NGO to receive"
    ),
    Step(
        MessageKind.TRAVEL_ARRANGED,
        KZ,
        (UZ, NGO),
        "travel_arranged",
        "books the flight, issues documents",
    ),
    Step(MessageKind.DEPARTED, KZ, (UZ, NGO), "departed", "the person has left Kazakhstan"),
    Step(
        MessageKind.RECEPTION_CONFIRMED,
        NGO,
        (KZ, UZ),
        "received",
        "the NGO met the person (trm ack)",
    ),
    Step(
        MessageKind.REINTEGRATION_UPDATE,
        NGO,
        (UZ, KZ),
        "reintegration",
        "shelter, medical, counselling",
    ),
    Step(MessageKind.CASE_CLOSED, UZ, (KZ, NGO), "closed", "reintegrated; the case is closed"),
)


class DemoFailed(TrmError):
    """A step of the demo did not complete; the message names the step."""

    reason = "demo_failed"


class Demo:
    """The demo on one local network, printing a line per step to `out`.

    With `console`, after the story the adapters start again and each
    participant's console is served (`trm.democonsoles`) until `stop` is set.
    """

    def __init__(
        self,
        workdir: Path,
        out: TextIO,
        *,
        amqp_url: str,
        management_url: str,
        console: bool = False,
        stop: threading.Event | None = None,
    ) -> None:
        self.workdir = workdir
        self.out = out
        self.amqp_url = amqp_url
        self.management_url = management_url
        self.case = EXAMPLE_CASE
        self.sent: list[SealedEnvelope] = []
        self.console = console
        self.stop = stop or threading.Event()

    def say(self, text: str) -> None:
        """One progress line."""
        print(text, file=self.out, flush=True)

    def run(self) -> None:
        """Every stage, then the auditor's checks; raises DemoFailed naming the failed step."""
        prepare_workdir(self.workdir)
        try:
            net = self._step("setup", self._create)
        finally:
            if self.workdir.is_dir():  # even half made, the folder is the demo's to wipe
                (self.workdir / MARKER).write_text("made by trm demo; wiped by the next run\n")
        try:
            self._step("start", lambda: self._start(net))
            for number, step in enumerate(STEPS, 1):
                label = f"[{number}/{len(STEPS)}] {step.kind}"
                self._step(label, partial(self._handoff, net, step, label))
            self._step("receipts", lambda: self._receipts(net))
            self._step("referral", lambda: Referral(self, net).run())
            self._step("witnesses", lambda: self._witnessed(net))
            self._step("shutdown", lambda: self._shutdown(net))
            self._step("audit", lambda: self._audit(net))
            if self.console:
                from trm.democonsoles import DemoConsoles

                DemoConsoles(self, net).run()
        finally:
            net.close(keep_vhost=True)  # queues stay inspectable until the next run
        self.say(f"\ndone: everything is in {self.workdir}/ (directory.json, audit.jsonl, logs/)")

    def _step(self, label: str, action: Callable[[], T]) -> T:
        try:
            return action()
        except (TrmError, TimeoutError, OSError, subprocess.SubprocessError) as e:
            raise DemoFailed(f"step {label} failed: {e}") from e

    def _create(self) -> LocalNetwork:
        net = create_network(
            self.workdir,
            DEMO_PARTICIPANTS,
            amqp_url=self.amqp_url,
            management_url=self.management_url,
            vhost=DEMO_VHOST,
            witnesses=WITNESSES,
            quorum=QUORUM,
        )
        names = ", ".join(p for p, *_ in DEMO_PARTICIPANTS)
        self.say(f"[setup] directory authority and participants {names}")
        self.say(
            f"[setup] signed trust directory -> {net.directory_file}; witnesses "
            f"{', '.join(WITNESSES)}, quorum {QUORUM}"
        )
        self.say(f"[setup] RabbitMQ vhost {net.vhost}: users, permissions, quorum queues")
        return net

    def _start(self, net: LocalNetwork) -> None:
        started = time.monotonic()
        self.start_processes(net)
        took = time.monotonic() - started
        self.say(
            f"[start] adapters {', '.join(ADAPTERS)} (witnesses {', '.join(WITNESSES)}) and "
            f"the routing service, each its own process, consuming after {took:.1f} s"
        )

    def start_processes(self, net: LocalNetwork) -> None:
        """Start every adapter and the routing service; wait until each consumes."""
        for participant in ADAPTERS:
            net.start_adapter(participant)
        self._start_routing(net)
        admin = AmqpSettings.from_url(self.amqp_url, vhost=net.vhost)
        queues = [inbox_queue(p) for p in ADAPTERS] + [ROUTING_QUEUE]
        queues += [witness_queue(p) for p in (*WITNESSES, ROUTING)]
        net.wait_for(
            lambda: all(queue_consumers(admin, queues).values()),
            STEP_TIMEOUT,
            "the adapters and the routing service to start consuming",
        )

    def _start_routing(self, net: LocalNetwork) -> None:
        args = ["routing", "run", "--home", str(net.home(ROUTING))]
        self.routing = net.start_process(
            [*args, "--checkpoint-interval", str(CHECKPOINT_SECONDS)], ROUTING
        )

    def _witnessed(self, net: LocalNetwork) -> None:
        """Wait until the newest checkpoint covers the whole log and carries the quorum.

        The routing service is stopped then (its final checkpoint signs nothing
        new), while the witnesses still run; should an envelope have arrived
        in between, it is started again to have the newer checkpoint cosigned.
        """
        admin = AmqpSettings.from_url(self.amqp_url, vhost=net.vhost)
        for _ in range(3):
            net.wait_for(
                lambda: _idle(net, admin) and _cosigned(net) is not None,
                STEP_TIMEOUT,
                f"the newest checkpoint to be cosigned by {QUORUM} witnesses",
            )
            net.stop(self.routing)
            found = _cosigned(net)
            if found is not None:
                size, names = found
                self.say(
                    f"[witnesses] checkpoint of size {size} cosigned by {', '.join(names)} "
                    f"(quorum {QUORUM}); routing service stopped"
                )
                return
            self._start_routing(net)
        raise ConfigError("the log kept growing past what the witnesses cosigned")

    def _handoff(self, net: LocalNetwork, step: Step, label: str) -> None:
        started = time.monotonic()
        reply_to = self.sent[-1].id if self.sent else None
        if step.kind is MessageKind.RECEPTION_CONFIRMED:
            sealed = confirm_reception(
                net.settings(NGO), self.case, place="Tashkent airport", engine=net.engine(NGO)
            )
        else:
            sealed = net.send(
                step.sender, step.kind, to=step.recipients, case=self.case, reply_to=reply_to
            )
        self.sent.append(sealed)
        envelope = str(sealed.id)
        for recipient in sealed.header.recipients:
            net.wait_for(
                partial(_applied, net, recipient, envelope),
                STEP_TIMEOUT,
                f"{recipient} to apply {step.kind}",
            )
        self.wait_stage(net, self.case, step.stage)
        to = ", ".join(sealed.header.recipients)
        took = time.monotonic() - started
        self.say(
            f"{label:<28} {step.sender} -> {to}: {step.story}; "
            f"applied by all in {took:.2f} s; routing stage {step.stage}"
        )

    def wait_stage(self, net: LocalNetwork, case: str, stage: str) -> None:
        """Wait until the routing service records `stage` for `case`."""
        net.wait_for(
            lambda: _routing_stage(net, case) == stage,
            STEP_TIMEOUT,
            f"the routing service to record stage {stage} of {case}",
        )

    def _receipts(self, net: LocalNetwork) -> None:
        expected = sum(len(s.header.recipients) for s in self.sent)
        net.wait_for(
            lambda: _receipts(net, self.sent) == expected,
            STEP_TIMEOUT,
            "every delivery receipt to reach its sender",
        )
        self.say(f"[receipts] {expected} signed delivery receipts back at their senders")

    def _shutdown(self, net: LocalNetwork) -> None:
        codes = net.stop_all()
        if any(codes):
            raise ConfigError(f"a process exited with {codes}: see {self.workdir}/logs/")
        self.say(f"[shutdown] {len(codes)} processes stopped cleanly; final checkpoint signed")

    def _audit(self, net: LocalNetwork) -> None:
        export = self.workdir / "audit.jsonl"
        routing_home = net.home(ROUTING)
        pub = net.authority / "authority.pub"
        env = net.environment(ROUTING)
        self._trm(["audit", "export", "--home", str(routing_home), "--out", str(export)], env)
        self._trm(
            [
                "audit",
                "verify",
                str(export),
                "--directory",
                str(net.directory_file),
                "--authority-key",
                str(pub),
            ],
            env,
        )
        replay = ["audit", "replay", str(export), "--authority-key", str(pub)]
        self._trm([*replay, "--against", net.database_url(ROUTING)], env)
        self.say("")
        self._trm(["cases", "show", self.case, "--home", str(routing_home)], env)

    def _trm(self, args: Sequence[str], env: dict[str, str]) -> None:
        shown = " ".join(a if len(a) < 40 else Path(a).name for a in args)
        self.say(f"[audit] $ trm {shown}")
        with (self.workdir / "logs" / "auditor.log").open("a", encoding="utf-8") as log:
            done = subprocess.run(
                [sys.executable, "-m", "trm", *args],
                stdout=subprocess.PIPE,
                stderr=log,
                text=True,
                env=env,
                cwd=self.workdir,
                check=False,
            )
        for line in done.stdout.splitlines():
            self.say(f"    {line}")
        if done.returncode != 0:
            raise ConfigError(
                f"`trm {args[0]} {args[1]}` exited {done.returncode}: see logs/auditor.log"
            )


class Referral:
    """The second story: a cross-border referral, then consent withdrawn with deletion."""

    def __init__(self, demo: Demo, net: LocalNetwork) -> None:
        self.demo = demo
        self.net = net
        self.case = REFERRAL_CASE

    def run(self) -> None:
        """Refer, accept, start the service, withdraw consent; show halts, erasures, a refusal."""
        self.demo.say("")
        request = sharing_with(example(MessageKind.REFERRAL_REQUEST), (NGO_KZ, NGO))
        self._handoff(
            "referral_request",
            NGO_KZ,
            lambda: self.net.send(
                NGO_KZ, MessageKind.REFERRAL_REQUEST, to=[NGO], case=self.case, message=request
            ),
            "refers a person for shelter and medical care (trm refer)",
            "referral_requested",
        )
        self._handoff(
            "referral_accepted",
            NGO,
            lambda: self.net.send(NGO, MessageKind.REFERRAL_ACCEPTED, to=[NGO_KZ], case=self.case),
            "accepts",
            "referral_accepted",
        )
        self._handoff(
            "service_started", NGO, lambda: report_service(
                self.net.settings(NGO), self.case, completed=False,
                services=["temporary_shelter", "medical"], engine=self.net.engine(NGO),
            ), "the shelter stay begins (trm service started)", "service_started"
        )  # fmt: skip
        self._withdraw()
        self._refused()

    def _handoff(
        self, label: str, sender: str, send: Callable[[], SealedEnvelope], story: str, stage: str
    ) -> SealedEnvelope:
        started = time.monotonic()
        sealed = send()
        self._await(sealed)
        self.demo.wait_stage(self.net, self.case, stage)
        to = ", ".join(sealed.header.recipients)
        took = time.monotonic() - started
        self.demo.say(
            f"[referral] {label:<19} {sender} -> {to}: {story}; "
            f"applied in {took:.2f} s; routing stage {stage}"
        )
        return sealed

    def _await(self, sealed: SealedEnvelope) -> None:
        for recipient in sealed.header.recipients:
            self.net.wait_for(
                partial(_applied, self.net, recipient, str(sealed.id)),
                STEP_TIMEOUT,
                f"{recipient} to apply {sealed.header.kind}",
            )

    def _withdraw(self) -> None:
        withdrawal = self._handoff(
            "consent_withdrawn",
            NGO_KZ,
            lambda: withdraw_consent(
                self.net.settings(NGO_KZ),
                self.case,
                delete_data=True,
                engine=self.net.engine(NGO_KZ),
            ),
            "the person withdraws consent and asks for deletion (trm withdraw)",
            "halted",
        )
        for party in (NGO_KZ, *withdrawal.header.recipients):
            self.net.wait_for(
                partial(_has_erased, self.net, party, self.case),
                STEP_TIMEOUT,
                f"{party} to erase case {self.case}",
            )
            erased = _erased(self.net, party, self.case)
            self.demo.say(
                f"[referral] {party:<24} case halted by {withdrawal.id}; "
                f"{erased} delivered payload(s) erased"
            )

    def _refused(self) -> None:
        try:
            report_service(
                self.net.settings(NGO), self.case, completed=True, engine=self.net.engine(NGO)
            )
        except ProtocolViolation as e:
            self.demo.say(f"[referral] a later `trm service completed` is refused: {e.reason}: {e}")
            return
        raise ConfigError(f"a send on the halted case {self.case} was not refused")


class _AppendingFile:
    """A file opened for each line, so the work folder may be wiped and remade meanwhile."""

    def __init__(self, path: Path) -> None:
        self.path = path

    def write(self, text: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(text)

    def flush(self) -> None:
        """Each write is closed, hence flushed, already."""


def log_json_to(path: Path) -> None:
    """This process's structlog lines as JSON into `path`, off the progress output."""
    logs.configure(_AppendingFile(path))


def prepare_workdir(workdir: Path) -> None:
    """Refuse to wipe a folder that is neither empty nor a previous demo's."""
    if workdir.exists() and any(workdir.iterdir()) and not (workdir / MARKER).exists():
        raise ConfigError(
            f"{workdir} exists and was not made by trm demo; choose another --workdir "
            "or remove it yourself"
        )


def _applied(net: LocalNetwork, participant: str, envelope_id: str) -> bool:
    return envelope_id in net.inbox_ids(participant)


def _erased(net: LocalNetwork, participant: str, case: str) -> int | None:
    """How many payloads `participant` erased of `case`, once it has, else None."""
    e = erasures_table.c
    query = sa.select(e.erased_payloads).where(e.case_ref == case, e.erased_at.is_not(None))
    with storage_errors("reading the erasures"), net.engine(participant).connect() as conn:
        found = conn.execute(query).scalar()
    return None if found is None else int(found)


def _has_erased(net: LocalNetwork, participant: str, case: str) -> bool:
    return _erased(net, participant, case) is not None


def _idle(net: LocalNetwork, admin: AmqpSettings) -> bool:
    """Nothing left to send by any adapter and nothing waiting for the routing service."""
    if any(net.outbox_pending(p) for p in ADAPTERS):
        return False
    return queue_depths(admin, [ROUTING_QUEUE])[ROUTING_QUEUE] == 0


def _cosigned(net: LocalNetwork) -> tuple[int, list[str]] | None:
    """(size, witnesses) if the newest checkpoint covers every entry and has the quorum.

    None too while the routing service has signed no checkpoint yet: the
    queues fall idle before its first one when the machine is busy.
    """
    try:
        log = AuditLog.reader(net.engine(ROUTING))
    except AuditError:
        return None
    latest = log.latest_checkpoint()
    if latest is None or latest[0] != log.size():
        return None
    directory = load_home_directory(net.home(ROUTING))
    names = sorted({c.witness for c in check_cosignatures(latest[2], directory)})
    return (latest[0], names) if len(names) >= QUORUM else None


def _routing_stage(net: LocalNetwork, case: str) -> str | None:
    state = CaseStore(net.engine(ROUTING)).get(case)
    return None if state is None or state.stage is None else str(state.stage)


def _receipts(net: LocalNetwork, sent: Sequence[SealedEnvelope]) -> int:
    total = 0
    for sender in {s.header.sender for s in sent}:
        ids = [str(s.id) for s in sent if s.header.sender == sender]
        query = sa.select(sa.func.count()).where(receipts_table.c.envelope_id.in_(ids))
        with storage_errors("counting receipts"), net.engine(sender).connect() as conn:
            total += int(conn.execute(query).scalar_one())
    return total


def run_demo(
    workdir: Path,
    out: TextIO,
    *,
    amqp_url: str,
    management_url: str,
    console: bool = False,
    stop: threading.Event | None = None,
) -> None:
    """Run the demo in `workdir` (wiped first if it holds a previous run).

    With `console`, leave the consoles running after the story until `stop` is set.
    """
    prepare_workdir(workdir)
    log_json_to(workdir / "logs" / "demo.log")
    Demo(
        workdir,
        out,
        amqp_url=amqp_url,
        management_url=management_url,
        console=console,
        stop=stop,
    ).run()
