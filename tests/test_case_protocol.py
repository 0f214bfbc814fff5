"""The case protocol enforced by every participant, over the real RabbitMQ with real adapter
processes: each attack a legitimate participant can try outside its role is refused by
the receiving adapter (quarantined with its reason, acked, nothing applied, no receipt)
and the honest message sent right after it is applied; `trm send` refuses the same
before anything is queued; consent is enforced and its withdrawal halts and erases."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from datetime import UTC, datetime
from uuid import UUID

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from adapters.sending import confirm_reception, report_service, withdraw_consent
from broker.caseviews import read_view
from broker.database import erasures_table, outbox_table, quarantine_table, receipts_table
from broker.directory import Role
from broker.envelope import SealedEnvelope, read_header, seal
from broker.errors import ProtocolViolation
from broker.testing import read_only
from broker.transport import Outgoing, Publisher
from schemas.base import Message, MessageKind
from schemas.control import DeliveryReceipt
from schemas.examples import example, sharing_with
from schemas.vocabulary import ConsentPurpose
from services.casestore import CaseStore
from trm.cli import cli
from trm.localnet import LocalNetwork, create_network

pytestmark = pytest.mark.rabbitmq

K = MessageKind
KZ, UZ, TJ = "iom-kz", "iom-uz", "iom-tj"
NGO = "ngo-uz-istiqbolli-avlod"
NGO_KZ = "ngo-kz-sana-sezim"
POLICE = "police-uz-tashkent"
ROUTING = "routing"
PARTICIPANTS = (
    (KZ, Role.MISSION, "KZ", None),
    (UZ, Role.MISSION, "UZ", None),
    (TJ, Role.MISSION, "TJ", None),
    (NGO, Role.NGO, "UZ", UZ),
    (NGO_KZ, Role.NGO, "KZ", KZ),
    (POLICE, Role.STATE_SERVICE, "UZ", None),
    (ROUTING, Role.ROUTING, "AT", None),
    ("auditor", Role.AUDITOR, "AT", None),
)
ADAPTERS = (KZ, UZ, TJ, NGO, NGO_KZ, POLICE)
WAIT = 60.0
"""Only for a hung run: adapters on a shared machine normally answer within a second."""
EVERYONE = [KZ, UZ, TJ, NGO, NGO_KZ, POLICE]


@pytest.fixture(scope="module")
def net(
    rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNetwork]:
    """One network for the module: an adapter per case participant and the routing service."""
    network = create_network(
        tmp_path_factory.mktemp("protocol"),
        PARTICIPANTS,
        amqp_url=rabbitmq_urls[0],
        management_url=rabbitmq_urls[1],
    )
    try:
        for participant in ADAPTERS:
            network.start_adapter(participant, env={"TRM_ERASURE_RETRY_SECONDS": "0.2"})
        network.start_process(["routing", "run", "--home", str(network.home(ROUTING))], ROUTING)
        yield network
    finally:
        network.close()


_cases = iter(range(1, 10_000))


def new_case(owner: str = KZ) -> str:
    """A fresh reference owned by `owner`."""
    return f"{owner}.T-{next(_cases):04d}-{os.getpid()}"


def opening(kind: K = K.RETURN_REQUEST, share_with: list[str] | None = None) -> Message:
    """The kind's example, its consent shared with `share_with` (default: every participant)."""
    return sharing_with(example(kind), share_with or EVERYONE)


def applied(net: LocalNetwork, participant: str, envelope: SealedEnvelope) -> None:
    """Wait until `participant` applied `envelope`."""
    net.wait_for(
        lambda: str(envelope.id) in net.inbox_ids(participant),
        WAIT,
        f"{participant} to apply {envelope.header.kind}",
    )


def sealed_by(
    net: LocalNetwork,
    sender: str,
    message: Message,
    *,
    to: list[str],
    case: str,
    seq: int = 1,
    reply_to: UUID | None = None,
) -> SealedEnvelope:
    """An envelope sealed with `sender`'s own keys, past `trm send` and its checks."""
    home = net.settings(sender)
    return seal(
        message,
        case=case,
        sender=home.sender(),
        recipients=to,
        directory=home.directory(),
        seq=seq,
        reply_to=reply_to,
    )


def publish(net: LocalNetwork, sender: str, sealed: SealedEnvelope) -> None:
    """Publish `sealed` with `sender`'s own login."""
    publisher = Publisher(net.settings(sender).amqp_settings(), sender)
    try:
        publisher.publish([Outgoing(str(sealed.id), tuple(sealed.header.recipients), sealed.raw)])
    finally:
        publisher.close()


def rogue(
    net: LocalNetwork,
    sender: str,
    message: Message,
    *,
    to: list[str],
    case: str,
    seq: int = 1,
    reply_to: UUID | None = None,
) -> SealedEnvelope:
    """What a participant that changed its software could put on the broker: an envelope
    sealed with its own keys and published with its own login, past `trm send`."""
    sealed = sealed_by(net, sender, message, to=to, case=case, seq=seq, reply_to=reply_to)
    publish(net, sender, sealed)
    return sealed


def refused(net: LocalNetwork, participant: str, envelope: SealedEnvelope) -> str:
    """The reason `participant` quarantined `envelope`, once it did; asserts nothing applied."""
    q = quarantine_table.c
    query = sa.select(q.reason).where(q.envelope_id == str(envelope.id))

    def reason() -> str | None:
        with net.engine(participant).connect() as conn:
            return conn.execute(query).scalar()

    net.wait_for(lambda: reason() is not None, WAIT, f"{participant} to quarantine it")
    assert str(envelope.id) not in net.inbox_ids(participant)
    assert str(envelope.id) not in receipts_answered(net, participant)
    return str(reason())


def receipts_answered(net: LocalNetwork, participant: str) -> set[str]:
    """Ids of the envelopes `participant` has queued a delivery receipt for."""
    with net.engine(participant).connect() as conn:
        bodies = conn.execute(
            sa.select(outbox_table.c.body).where(outbox_table.c.kind == K.DELIVERY_RECEIPT)
        ).scalars()
        return {str(read_header(body).reply_to) for body in bodies}


def open_return(net: LocalNetwork, case: str, to: tuple[str, ...] = (UZ,)) -> SealedEnvelope:
    """KZ opens a return case to `to`; waits until every recipient applied it."""
    sealed = net.send(KZ, K.RETURN_REQUEST, to=to, case=case, message=opening())
    for recipient in to:
        applied(net, recipient, sealed)
    return sealed


def routing_anomalies(net: LocalNetwork, case: str, count: int) -> list[str]:
    """The anomaly reasons the routing service recorded on `case`, once there are `count`."""

    def found() -> list[str]:
        state = CaseStore(net.engine(ROUTING)).get(case)
        return [] if state is None else [a.reason for a in state.anomalies]

    net.wait_for(lambda: len(found()) >= count, WAIT, f"{count} anomalies on {case}")
    return found()


# --- who may say what, on whose case ------------------------------------------------------


def test_outsider_mission_cannot_join_a_case_nor_receive_the_reception_note(net):
    """iom-tj, no party to KZ's case, sends a reintegration update on it to the NGO: the NGO
    refuses it (not_a_party); its `trm ack` then goes to the two missions only."""
    case = new_case()
    request = open_return(net, case, (UZ, NGO))
    intruder = rogue(net, TJ, example(K.REINTEGRATION_UPDATE), to=[NGO], case=case)
    assert refused(net, NGO, intruder) == "not_a_party"
    ack = confirm_reception(net.settings(NGO), case, note="health notes", engine=net.engine(NGO))
    assert sorted(ack.header.recipients) == [KZ, UZ]
    assert ack.header.reply_to == request.id
    applied(net, KZ, ack)
    assert str(ack.id) not in net.inbox_ids(TJ)
    assert TJ not in read_view_of(net, NGO, case).parties


def read_view_of(net: LocalNetwork, participant: str, case: str):
    with net.engine(participant).connect() as conn:
        view = read_view(conn, case)
    assert view is not None, f"{participant} does not know {case}"
    return view


def test_ngo_cannot_send_what_its_role_may_not(net):
    """An NGO's reminder (routing only) and return acceptance (missions only) are refused by
    KZ with wrong_role; its reception confirmation right after them is applied."""
    case = new_case()
    open_return(net, case, (UZ, NGO))
    reminder = rogue(net, NGO, example(K.REMINDER), to=[KZ], case=case, seq=1)
    accepted = rogue(net, NGO, example(K.RETURN_ACCEPTED), to=[KZ], case=case, seq=2)
    assert refused(net, KZ, reminder) == "wrong_role"
    assert refused(net, KZ, accepted) == "wrong_role"
    honest = rogue(net, NGO, example(K.RECEPTION_CONFIRMED), to=[KZ], case=case, seq=3)
    applied(net, KZ, honest)
    assert str(honest.id) in receipts_answered(net, KZ)
    # Adapters judge who may speak; the routing service also sees that reception came early.
    assert routing_anomalies(net, case, 3) == ["wrong_role", "wrong_role", "out_of_order"]


def test_receipts_only_from_recipients_and_with_the_digest(net):
    """A receipt for an envelope KZ never sent to the NGO, and one naming another digest,
    are refused; the recipient's true receipt is recorded."""
    case = new_case()
    request = open_return(net, case, (UZ,))
    net.wait_for(lambda: _receipt_from(net, request, UZ), WAIT, "UZ's true receipt")
    now = datetime.now(UTC)
    stranger = DeliveryReceipt(
        envelope_id=request.id, digest=request.digest, received_at=now, applied_at=now
    )
    unmatched = rogue(net, NGO, stranger, to=[KZ], case=case, reply_to=request.id)
    assert refused(net, KZ, unmatched) == "unmatched_receipt"
    travel = net.send(KZ, K.TRAVEL_ARRANGED, to=[UZ, NGO], case=case)
    applied(net, NGO, travel)
    wrong = DeliveryReceipt(envelope_id=travel.id, digest="0" * 64, received_at=now, applied_at=now)
    mismatch = rogue(net, NGO, wrong, to=[KZ], case=case, seq=2, reply_to=travel.id)
    assert refused(net, KZ, mismatch) == "receipt_mismatch"
    net.wait_for(lambda: _receipt_from(net, travel, NGO), WAIT, "the NGO's true receipt")
    assert not _receipt_from(net, request, NGO)


def _receipt_from(net: LocalNetwork, envelope: SealedEnvelope, recipient: str) -> bool:
    r = receipts_table.c
    query = sa.select(r.receipt_envelope_id).where(
        r.envelope_id == str(envelope.id), r.recipient == recipient
    )
    with net.engine(envelope.header.sender).connect() as conn:
        return conn.execute(query).first() is not None


def test_a_case_reference_cannot_be_squatted(net):
    """The NGO cannot open a case under KZ's reference: `trm send` refuses it, the receiving
    mission refuses it when sent past `trm send`, the routing service records it without
    giving the case away, and KZ's own request then opens the case everywhere."""
    case = new_case(KZ)
    with pytest.raises(ProtocolViolation, match="only its owner opens it") as caught:
        net.send(NGO, K.REFERRAL_REQUEST, to=[UZ], case=case, message=opening(K.REFERRAL_REQUEST))
    assert caught.value.reason == "not_the_owner"
    squat = rogue(net, NGO, opening(K.REFERRAL_REQUEST), to=[UZ], case=case)
    assert refused(net, UZ, squat) == "not_the_owner"
    assert routing_anomalies(net, case, 1) == ["not_the_owner"]
    request = open_return(net, case, (UZ,))
    net.wait_for(
        lambda: _routing_stage(net, case) == "requested", WAIT, "the owner's request at routing"
    )
    assert read_view_of(net, UZ, case).owner == KZ
    assert str(request.id) in net.inbox_ids(UZ)


def _routing_stage(net: LocalNetwork, case: str) -> str | None:
    state = CaseStore(net.engine(ROUTING)).get(case)
    return None if state is None or state.stage is None else str(state.stage)


def test_trm_send_refuses_with_a_one_line_reason_and_queues_nothing(net):
    """`trm send` of a reminder by an NGO exits non-zero with one line naming the rule."""
    case = new_case()
    open_return(net, case, (UZ, NGO))
    payload = net.root / "reminder.json"
    payload.write_bytes(json.dumps(example(K.REMINDER).model_dump(mode="json")).encode())
    before = _outbox_count(net, NGO)
    result = CliRunner().invoke(
        cli,
        [
            *("send", "reminder", "--home", str(net.home(NGO)), "--to", KZ, "--case", case),
            *("--payload", str(payload)),
        ],
        env=net.environment(NGO),
    )
    assert result.exit_code == 1
    [line] = result.output.strip().splitlines()
    assert line.startswith("Error: wrong_role: ngo-uz-istiqbolli-avlod is a ngo; reminder")
    assert _outbox_count(net, NGO) == before


def _outbox_count(net: LocalNetwork, participant: str) -> int:
    with net.engine(participant).connect() as conn:
        return int(conn.execute(sa.select(sa.func.count()).select_from(outbox_table)).scalar_one())


# --- consent ----------------------------------------------------------------------------


def test_consent_scope_limits_recipients_at_sender_and_receiver(net):
    """A request whose consent shares with KZ only: `trm send` names iom-uz as outside it;
    sent past `trm send`, iom-uz refuses it (outside_consent)."""
    case = new_case()
    narrow = opening(share_with=[KZ])
    with pytest.raises(ProtocolViolation, match="does not share with iom-uz") as caught:
        net.send(KZ, K.RETURN_REQUEST, to=[UZ], case=case, message=narrow)
    assert caught.value.reason == "outside_consent"
    forced = rogue(net, KZ, narrow, to=[UZ], case=case)
    assert refused(net, UZ, forced) == "outside_consent"
    honest = open_return(net, new_case(), (UZ,))
    assert str(honest.id) in net.inbox_ids(UZ)


def test_consent_purposes_limit_what_may_be_sent(net):
    """Consent for return assistance only: a reintegration update is refused by `trm send`
    naming the purpose, and by the receiver when sent past it."""
    case = new_case()
    request = example(K.RETURN_REQUEST)
    scope = request.consent.scope.model_copy(  # type: ignore[attr-defined]
        update={"share_with": tuple(EVERYONE), "purposes": (ConsentPurpose.RETURN_ASSISTANCE,)}
    )
    consent = request.consent.model_copy(update={"scope": scope})  # type: ignore[attr-defined]
    sealed = net.send(
        KZ,
        K.RETURN_REQUEST,
        to=[UZ],
        case=case,
        message=request.model_copy(update={"consent": consent}),
    )
    applied(net, UZ, sealed)
    with pytest.raises(ProtocolViolation, match="purpose reintegration"):
        net.send(UZ, K.REINTEGRATION_UPDATE, to=[KZ], case=case)
    forced = rogue(net, UZ, example(K.REINTEGRATION_UPDATE), to=[KZ], case=case, seq=1)
    assert refused(net, KZ, forced) == "outside_consent"
    honest = net.send(UZ, K.RETURN_ACCEPTED, to=[KZ], case=case)
    applied(net, KZ, honest)


def test_withdrawal_halts_erases_and_confirms_everywhere(net):
    """After KZ's withdrawal with delete_data: every party halts the case and erases its
    payloads, confirms to KZ, `trm send` refuses a new request with the person's name, a
    request sent past it is refused (consent_withdrawn), and closing is still allowed."""
    case = new_case()
    open_return(net, case, (UZ, NGO))
    accepted = net.send(UZ, K.RETURN_ACCEPTED, to=[KZ, NGO], case=case)
    applied(net, NGO, accepted)
    applied(net, KZ, accepted)
    assert _files(net, NGO, case) == 2
    assert _files(net, KZ, case) == 1
    withdrawal = withdraw_consent(net.settings(KZ), case, delete_data=True, engine=net.engine(KZ))
    assert sorted(withdrawal.header.recipients) == sorted([NGO, UZ])
    for party in (UZ, NGO):
        applied(net, party, withdrawal)
        net.wait_for(lambda p=party: _files(net, p, case) == 0, WAIT, f"{party} to erase")
        assert read_view_of(net, party, case).halted_by == str(withdrawal.id)
    net.wait_for(lambda: _confirmations(net, case) == {UZ: 1, NGO: 2}, WAIT, "two confirmations")
    assert not (net.settings(KZ).case_dir / f"{accepted.id}.json").exists()
    with pytest.raises(ProtocolViolation, match="withdrawn") as caught:
        net.send(KZ, K.TRAVEL_ARRANGED, to=[UZ, NGO], case=case)
    assert caught.value.reason == "consent_withdrawn"
    late = rogue(net, UZ, example(K.TRAVEL_ARRANGED), to=[KZ, NGO], case=case, seq=2)
    assert refused(net, NGO, late) == "consent_withdrawn"
    assert refused(net, KZ, late) == "consent_withdrawn"
    closed = net.send(KZ, K.CASE_CLOSED, to=[UZ, NGO], case=case)
    applied(net, UZ, closed)
    net.wait_for(lambda: _routing_stage(net, case) == "closed", WAIT, "routing to close")


def _files(net: LocalNetwork, participant: str, case: str) -> int:
    return sum(d["case"] == case for d in net.delivered_documents(participant))


def _confirmations(net: LocalNetwork, case: str) -> dict[str, int]:
    """Erasure confirmations KZ applied on `case`: sender -> payloads erased."""
    found = {}
    for document in net.delivered_documents(KZ):
        if document["case"] == case and document["kind"] == "erasure_confirmed":
            found[document["sender"]] = document["payload"]["erased_payloads"]
    return found


def test_withdrawal_racing_a_message_in_flight(net):
    """UZ's acceptance, sealed before KZ's withdrawal, reaches the NGO after it: refused with
    consent_withdrawn, and nothing of it is applied."""
    case = new_case()
    open_return(net, case, (UZ, NGO))
    in_flight = sealed_by(net, UZ, example(K.RETURN_ACCEPTED), to=[NGO], case=case)
    withdrawal = rogue(net, KZ, example(K.CONSENT_WITHDRAWN), to=[NGO], case=case, seq=2)
    applied(net, NGO, withdrawal)
    publish(net, UZ, in_flight)
    assert refused(net, NGO, in_flight) == "consent_withdrawn"


def test_withdrawal_for_a_case_never_seen_halts_it_there(net):
    """KZ's withdrawal also reaches the Tashkent police, which never saw the case: there the
    case is halted (nothing to erase, confirmed with 0); the same from a non-owner is refused."""
    case = new_case()
    open_return(net, case, (UZ,))
    stranger = rogue(net, TJ, example(K.CONSENT_WITHDRAWN), to=[POLICE], case=case)
    assert refused(net, POLICE, stranger) == "not_a_party"
    withdrawal = net.send(
        KZ,
        K.CONSENT_WITHDRAWN,
        to=[UZ, POLICE],
        case=case,
        message=example(K.CONSENT_WITHDRAWN).model_copy(update={"delete_data": True}),
    )
    applied(net, POLICE, withdrawal)
    assert read_view_of(net, POLICE, case).halted_by == str(withdrawal.id)
    net.wait_for(
        lambda: _confirmations(net, case) == {POLICE: 0, UZ: 1}, WAIT, "both confirmations"
    )


def test_erasure_in_a_read_only_folder_is_recorded_and_retried(net):
    """The NGO's case folder is read-only when the withdrawal arrives: the withdrawal is
    applied and the case halted, the erasure fails with a clear error, and it is done and
    confirmed once the folder is writable again."""
    case = new_case()
    open_return(net, case, (UZ, NGO))
    folder = net.settings(NGO).case_dir
    with read_only(folder):
        withdrawal = withdraw_consent(
            net.settings(KZ), case, delete_data=True, engine=net.engine(KZ)
        )
        applied(net, NGO, withdrawal)
        net.wait_for(lambda: _erasure_error(net, NGO, case) is not None, WAIT, "the failure")
        assert "make the folder writable" in str(_erasure_error(net, NGO, case))
        assert read_view_of(net, NGO, case).halted
        assert _files(net, NGO, case) == 1
    net.wait_for(lambda: NGO in _confirmations(net, case), WAIT, "the retried erasure")
    assert _files(net, NGO, case) == 0


def _erasure_error(net: LocalNetwork, participant: str, case: str) -> str | None:
    e = erasures_table.c
    with net.engine(participant).connect() as conn:
        return conn.execute(sa.select(e.last_error).where(e.case_ref == case)).scalar()


# --- referrals ------------------------------------------------------------------------------


def test_referral_to_a_state_service_walks_every_stage(net):
    """The Kazakh NGO refers a person to the Tashkent police (a state service, no parent):
    accepted, service started and completed (not done, with the reason), then closed; the
    routing service follows every stage."""
    case = new_case(NGO_KZ)
    request = net.send(
        NGO_KZ, K.REFERRAL_REQUEST, to=[POLICE], case=case, message=opening(K.REFERRAL_REQUEST)
    )
    applied(net, POLICE, request)
    accepted = net.send(POLICE, K.REFERRAL_ACCEPTED, to=[NGO_KZ], case=case)
    applied(net, NGO_KZ, accepted)
    police = net.settings(POLICE)
    started = report_service(
        police, case, completed=False, services=["legal"], engine=net.engine(POLICE)
    )
    applied(net, NGO_KZ, started)
    done = report_service(
        police, case, completed=True, not_done_reason="person_declined", engine=net.engine(POLICE)
    )
    applied(net, NGO_KZ, done)
    net.wait_for(
        lambda: _routing_stage(net, case) == "service_completed", WAIT, "routing's last stage"
    )
    closed = net.send(NGO_KZ, K.CASE_CLOSED, to=[POLICE], case=case)
    applied(net, POLICE, closed)
    net.wait_for(lambda: _routing_stage(net, case) == "closed", WAIT, "routing to close")
    state = CaseStore(net.engine(ROUTING)).get(case)
    assert state is not None and state.anomalies == ()
    assert read_view_of(net, NGO_KZ, case).stage == "closed"
