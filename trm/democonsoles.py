"""``trm demo --console``: the participants' consoles left running after the story.

Once the demo's story and audit are done, the adapters of both missions
and the NGO start again, a second return is walked up to the person's
departure (so the NGO has a reception to confirm in its console), and a
console is served for each mission, the NGO and the auditor
(`trm.consoles`), each with one account whose random password is printed
once. Everything stops cleanly on Ctrl-C (SIGINT) or SIGTERM.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from types import FrameType
from typing import TYPE_CHECKING

from broker.topology import inbox_queue, queue_consumers
from broker.transport import AmqpSettings
from schemas.base import MessageKind
from trm.consoles import ServedConsole, serve_console
from trm.localnet import LocalNetwork

if TYPE_CHECKING:
    from trm.demo import Demo

SECOND_CASE = "iom-kz.KZ-2026-0418"
"""The return left waiting for the NGO's reception, to confirm in its console."""
CONSOLES: tuple[tuple[str, str], ...] = (
    ("iom-kz", "aigerim"),
    ("iom-uz", "bekzod"),
    ("ngo-uz-istiqbolli-avlod", "dilnoza"),
    ("auditor", "auditor"),
)
"""(participant, username) of each console the demo serves."""
ADAPTERS = ("iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod")
"""The consoles' participants whose adapters run again (the auditor has none)."""
WAITING = (
    (MessageKind.RETURN_REQUEST, "iom-kz", ("iom-uz", "ngo-uz-istiqbolli-avlod")),
    (MessageKind.RETURN_ACCEPTED, "iom-uz", ("iom-kz", "ngo-uz-istiqbolli-avlod")),
    (MessageKind.TRAVEL_ARRANGED, "iom-kz", ("iom-uz", "ngo-uz-istiqbolli-avlod")),
    (MessageKind.DEPARTED, "iom-kz", ("iom-uz", "ngo-uz-istiqbolli-avlod")),
)
"""The second return's handoffs, up to the departure."""


class DemoConsoles:
    """The consoles stage of one demo run."""

    def __init__(self, demo: Demo, net: LocalNetwork) -> None:
        self.demo = demo
        self.net = net
        self.served: list[ServedConsole] = []

    def run(self) -> None:
        """Start everything, print the addresses and logins, wait for the stop, stop."""
        from trm.demo import STEP_TIMEOUT

        say = self.demo.say
        say("")
        self._start_adapters()
        for kind, sender, to in WAITING:
            sealed = self.net.send(sender, kind, to=to, case=SECOND_CASE)
            for recipient in to:
                self.net.wait_for(
                    partial(_has, self.net, recipient, str(sealed.id)),
                    STEP_TIMEOUT,
                    f"{recipient} to apply {kind} of {SECOND_CASE}",
                )
        say(f"[console] a second return, {SECOND_CASE}, has departed: the NGO can confirm it")
        try:
            for participant, username in CONSOLES:
                served = serve_console(self.net.settings(participant))
                self.served.append(served)
                login = served.add_login(username)
                say(
                    f"[console] {participant:<24} {served.url}/  "
                    f"user {login.username}  password {login.password}"
                )
            say(
                f"[console] the auditor's console verifies {self.demo.workdir / 'audit.jsonl'} "
                "(upload it on its start page)"
            )
            say("[console] running until Ctrl-C")
            with _stopped_by_signals(self.demo.stop):
                while not self.demo.stop.wait(0.5):
                    pass
        finally:
            for served in self.served:
                served.stop()
        codes = self.net.stop_all()
        say(f"[console] consoles and {len(codes)} processes stopped")

    def _start_adapters(self) -> None:
        """Start the adapters of the consoles' participants; wait until each consumes."""
        from trm.demo import STEP_TIMEOUT

        participants = [p for p, _ in CONSOLES if p in ADAPTERS]
        for participant in participants:
            self.net.start_adapter(participant)
        admin = AmqpSettings.from_url(self.demo.amqp_url, vhost=self.net.vhost)
        queues = [inbox_queue(p) for p in participants]
        self.net.wait_for(
            lambda: all(queue_consumers(admin, queues).values()),
            STEP_TIMEOUT,
            f"the adapters of {', '.join(participants)} to start consuming",
        )


def _has(net: LocalNetwork, participant: str, envelope_id: str) -> bool:
    return envelope_id in net.inbox_ids(participant)


@contextmanager
def _stopped_by_signals(stop: threading.Event) -> Iterator[None]:
    """SIGINT and SIGTERM set `stop` while inside (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stop.set()

    before = {sig: signal.signal(sig, handle) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in before.items():
            signal.signal(sig, handler)
