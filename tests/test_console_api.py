"""The console's API end to end over the real RabbitMQ with real adapter processes: iom-kz
sends a return request through its API, iom-uz's console (a real `trm console run`) lists it
since a cursor, streams it as a server-sent event, serves its payload; the NGO confirms
reception through its API; iom-kz's envelope status shows both receipts; iom-uz withdraws
consent with deletion and the response states the erasure it caused."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import httpx
import pytest
from click.testing import CliRunner
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker.testing import DEFAULT_PARTICIPANTS
from console import trail
from console.app import create_app
from console.tokens import add_token
from schemas.base import MessageKind
from schemas.examples import example, sharing_with
from trm.cli import cli
from trm.localnet import LocalNetwork, create_network

pytestmark = pytest.mark.rabbitmq

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
WAIT = 60.0
"""Only for a hung run: the adapters and the console answer within a second or two."""
ALL_SCOPES = ["read", "send", "receipts", "consent", "quarantine", "events"]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


@dataclass
class Served:
    """iom-uz's console as a real server process, and a token for it."""

    url: str
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


@pytest.fixture(scope="module")
def net(
    rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNetwork]:
    """KZ, UZ and the NGO, each with its adapter running."""
    network = create_network(
        tmp_path_factory.mktemp("console-api"),
        DEFAULT_PARTICIPANTS,
        amqp_url=rabbitmq_urls[0],
        management_url=rabbitmq_urls[1],
    )
    try:
        for participant in (KZ, UZ, NGO):
            network.start_adapter(participant)
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module")
def uz(net: LocalNetwork) -> Served:
    """`trm console run` on iom-uz's home, with a token made by `trm console token add`."""
    made = CliRunner().invoke(
        cli,
        ["console", "token", "add", "uz-cms", "--home", str(net.home(UZ))]
        + [arg for scope in ALL_SCOPES for arg in ("--scope", scope)],
    )
    assert made.exit_code == 0, made.output
    token = made.stdout.strip().splitlines()[0]
    port = _free_port()
    net.start_process(
        ["console", "run", "--home", str(net.home(UZ)), "--port", str(port)], "console-uz"
    )
    served = Served(f"http://127.0.0.1:{port}", token)

    def answers() -> bool:
        try:
            return httpx.get(f"{served.url}/api/v1/outbox", headers=served.headers).is_success
        except httpx.TransportError:
            return False

    net.wait_for(answers, WAIT, "iom-uz's console to answer")
    return served


def in_process(net: LocalNetwork, participant: str) -> tuple[TestClient, dict[str, str], FastAPI]:
    """`participant`'s console in this process, and a token with every scope."""
    app = create_app(net.settings(participant), allowed_hosts=["testserver"])
    token = add_token(app.state.console.engine, f"{participant}-cms", ALL_SCOPES)
    return TestClient(app), {"Authorization": f"Bearer {token}"}, app


def read_events(
    served: Served, until: str, *, after: int | None = None, last_event_id: str | None = None
) -> list[dict[str, Any]]:
    """Server-sent events from iom-uz's console until one names envelope `until`."""
    headers = dict(served.headers)
    if last_event_id is not None:
        headers["Last-Event-ID"] = last_event_id
    params = {} if after is None else {"after": str(after)}
    events: list[dict[str, Any]] = []
    current: dict[str, Any] = {}
    timeout = httpx.Timeout(WAIT)
    with httpx.stream(
        "GET", f"{served.url}/api/v1/events", headers=headers, params=params, timeout=timeout
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        assert response.headers["cache-control"] == "no-store"
        for line in response.iter_lines():
            if line.startswith(("id:", "event:", "data:")):
                field, _, value = line.partition(":")
                current[field] = value.strip()
            elif line == "" and "data" in current:
                events.append(current)
                current = {}
                if until in events[-1]["data"]:
                    return events
    raise AssertionError(f"the stream ended before envelope {until}")


def test_a_return_request_over_the_api_end_to_end(net, uz):
    """Sent by KZ's API, listed and streamed by UZ's since a cursor, its payload served
    decrypted, reception confirmed by the NGO's API, both receipts in KZ's envelope status,
    the SSE stream resumed with Last-Event-ID, and consent withdrawn with its erasure stated."""
    kz, kz_auth, kz_app = in_process(net, KZ)
    ngo, ngo_auth, _ = in_process(net, NGO)
    case = f"{KZ}.API-0001"
    message = sharing_with(example(MessageKind.RETURN_REQUEST), [KZ, UZ, NGO])
    payload = message.model_dump(mode="json")

    start = httpx.get(f"{uz.url}/api/v1/deliveries", headers=uz.headers).json()["cursor"]
    sent = kz.post(
        "/api/v1/messages",
        headers=kz_auth,
        json={"kind": "return_request", "to": [UZ, NGO], "case": case, "payload": payload},
    )
    assert sent.status_code == 201, sent.text
    envelope_id = sent.json()["envelope_id"]

    streamed = read_events(uz, envelope_id, after=start)
    delivery = streamed[-1]
    assert delivery["event"] == "delivery"
    assert int(delivery["id"]) > start

    page = httpx.get(
        f"{uz.url}/api/v1/deliveries", headers=uz.headers, params={"after": start}
    ).json()
    assert [d["envelope_id"] for d in page["deliveries"]] == [envelope_id]
    assert page["cursor"] == int(delivery["id"])
    assert httpx.get(
        f"{uz.url}/api/v1/deliveries", headers=uz.headers, params={"after": page["cursor"]}
    ).json() == {"deliveries": [], "cursor": page["cursor"]}

    fetched = httpx.get(f"{uz.url}/api/v1/deliveries/{envelope_id}", headers=uz.headers)
    assert fetched.status_code == 200
    assert fetched.headers["cache-control"] == "no-store"
    body = fetched.json()
    assert (body["sender"], body["case"], body["kind"]) == (KZ, case, "return_request")
    assert body["payload"] == payload

    net.wait_for(
        lambda: any(
            d["envelope_id"] == envelope_id
            for d in ngo.get("/api/v1/deliveries", headers=ngo_auth).json()["deliveries"]
        ),
        WAIT,
        "the NGO to list the request",
    )
    confirmed = ngo.post(
        f"/api/v1/cases/{case}/reception",
        headers=ngo_auth,
        json={"place": "Tashkent airport", "note": "tired, well"},
    )
    assert confirmed.status_code == 201, confirmed.text
    reception_id = confirmed.json()["envelope_id"]
    assert sorted(confirmed.json()["recipients"]) == [KZ, UZ]

    def status() -> dict[str, Any]:
        answer: dict[str, Any] = kz.get(f"/api/v1/envelopes/{envelope_id}", headers=kz_auth).json()
        return answer

    net.wait_for(lambda: status()["state"] == "received", WAIT, "both receipts at KZ")
    receipts = {r["recipient"]: r for r in status()["recipients"]}
    assert set(receipts) == {UZ, NGO}
    assert all(r["receipt_at"] and r["receipt_envelope_id"] for r in receipts.values())
    assert status()["published_at"] is not None

    resumed = read_events(uz, reception_id, last_event_id=delivery["id"])
    assert all(int(e["id"]) > int(delivery["id"]) for e in resumed)
    assert resumed[-1]["event"] == "delivery"

    net.wait_for(
        lambda: any(
            e["kind"] == "reception_confirmed"
            for e in kz.get(f"/api/v1/cases/{case}", headers=kz_auth).json()["timeline"]
        ),
        WAIT,
        "the reception confirmation in KZ's timeline",
    )
    timeline = kz.get(f"/api/v1/cases/{case}", headers=kz_auth).json()["timeline"]
    assert [(e["direction"], e["kind"]) for e in timeline] == [
        ("sent", "return_request"),
        ("received", "reception_confirmed"),
    ]
    assert sorted(timeline[0]["receipts_from"]) == sorted([NGO, UZ])

    withdrawn = httpx.post(
        f"{uz.url}/api/v1/cases/{case}/consent-withdrawal",
        headers=uz.headers,
        json={"delete_data": True},
    )
    assert withdrawn.status_code == 201, withdrawn.text
    erasure = withdrawn.json()["erasure"]
    assert erasure["withdrawal"] == withdrawn.json()["envelope"]["envelope_id"]
    assert erasure["erased_payloads"] == 2
    gone = httpx.get(f"{uz.url}/api/v1/deliveries/{envelope_id}", headers=uz.headers)
    assert gone.status_code == 410

    actions = [(e.actor, e.action) for e in trail.entries(kz_app.state.console.engine)]
    assert (f"token:{KZ}-cms", "send") in actions
    uz_trail = httpx.get(f"{uz.url}/api/v1/trail", headers=uz.headers).json()
    assert [(e["actor"], e["action"], e["case"]) for e in uz_trail] == [
        ("token:uz-cms", "withdraw_consent", case),
        ("token:uz-cms", "read_payload", case),
        ("cli:", "token_add", None),
    ]
    assert uz_trail[1]["envelope_id"] == envelope_id


def test_the_quarantine_over_the_api_lists_streams_and_requeues(net, uz):
    """An envelope iom-uz refuses (KZ's return request with its signature broken, published
    past `trm send`) is listed with its reason, streamed as a quarantine event and shown as
    quarantined by its status; requeued through the API it is refused again, with the
    requeue in the trail."""
    from broker.envelope import seal
    from broker.transport import Outgoing, Publisher

    start = httpx.get(f"{uz.url}/api/v1/deliveries", headers=uz.headers).json()["cursor"]
    home = net.settings(KZ)
    rogue = seal(
        example(MessageKind.RETURN_REQUEST),
        case=f"{KZ}.API-ROGUE",
        sender=home.sender(),
        recipients=[UZ],
        directory=home.directory(),
        seq=1,
    )
    publisher = Publisher(home.amqp_settings(), KZ)
    try:
        broken = rogue.raw[:-1] + bytes([rogue.raw[-1] ^ 1])
        publisher.publish([Outgoing(str(rogue.id), (UZ,), broken)])
    finally:
        publisher.close()

    streamed = read_events(uz, str(rogue.id), after=start)
    assert streamed[-1]["event"] == "quarantine"
    listed = httpx.get(f"{uz.url}/api/v1/quarantine", headers=uz.headers).json()
    [record] = [r for r in listed if r["envelope_id"] == str(rogue.id)]
    assert (record["sender"], record["reason"], record["in_database"]) == (
        KZ,
        "bad_signature",
        True,
    )
    status = httpx.get(f"{uz.url}/api/v1/envelopes/{rogue.id}", headers=uz.headers).json()
    assert status["state"] == "quarantined"

    requeued = httpx.post(f"{uz.url}/api/v1/quarantine/{record['id']}/requeue", headers=uz.headers)
    assert requeued.status_code == 200, requeued.text
    assert requeued.json()["requeued_at"] is not None

    def refused_again() -> bool:
        rows = httpx.get(f"{uz.url}/api/v1/quarantine", headers=uz.headers).json()
        again = [r for r in rows if r["envelope_id"] == str(rogue.id)]
        return bool(again) and all(r["requeued_at"] is None for r in again)

    net.wait_for(refused_again, WAIT, "iom-uz to refuse the requeued envelope again")
    trail_entries = httpx.get(f"{uz.url}/api/v1/trail", headers=uz.headers).json()
    assert (trail_entries[0]["action"], trail_entries[0]["envelope_id"]) == (
        "requeue",
        str(rogue.id),
    )
