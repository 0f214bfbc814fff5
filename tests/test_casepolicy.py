"""The case protocol's rules as pure functions, the case views' storage, and its documentation."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest
from sqlalchemy.engine import Engine
from sqlalchemy.exc import OperationalError

from broker.casepolicy import (
    CaseMessage,
    CaseView,
    Consent,
    Reason,
    Stage,
    advance,
    case_owner,
    check,
    check_outgoing,
    check_receipt,
    rules_table,
)
from broker.caseviews import read_view, read_views, write_views
from broker.database import open_database
from broker.directory import Role

K_REQUEST = "return_request"
KZ, UZ, TJ = "iom-kz", "iom-uz", "iom-tj"
NGO = "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0042"
SECURITY = Path(__file__).resolve().parent.parent / "docs" / "security.md"
EVERYONE = Consent(frozenset({KZ, UZ, NGO}), frozenset({"return_assistance", "reception"}))

_ids = iter(range(1, 1_000_000))


def said(kind: str, sender: str, *recipients: str, case: str = CASE) -> CaseMessage:
    """A message of `kind` from `sender`, with a fresh envelope id."""
    from schemas.base import MessageKind

    return CaseMessage(f"e{next(_ids)}", MessageKind(kind), case, sender, tuple(recipients))


def opened(*recipients: str, consent: Consent = EVERYONE) -> CaseView:
    """KZ's case as it is after KZ's request to `recipients`."""
    view = advance(None, said(K_REQUEST, KZ, *recipients), consent)
    assert view is not None
    return view


def reason(found: object) -> str | None:
    return None if found is None else str(found.reason)  # type: ignore[attr-defined]


def test_the_reference_names_its_owner() -> None:
    """The owner is the part before the first dot; without one there is none."""
    assert case_owner("iom-kz.KZ-2026-0042") == KZ
    assert case_owner("ngo-kz-rodnik.REF.7") == "ngo-kz-rodnik"
    assert case_owner("KZ-2026-0042") == ""
    assert case_owner("iom-kz.") == ""


def test_only_the_owner_opens_and_only_once() -> None:
    """An NGO's request under KZ's reference is not_the_owner; KZ's second one is refused."""
    squat = said("referral_request", NGO, UZ)
    assert reason(check(None, squat, Role.NGO, vouchers=())) == Reason.NOT_THE_OWNER
    assert check(None, said(K_REQUEST, KZ, UZ), Role.MISSION, vouchers=()) is None
    again = check(opened(UZ), said(K_REQUEST, KZ, UZ), Role.MISSION, vouchers=())
    assert reason(again) == Reason.IMPOSSIBLE_TRANSITION
    unowned = said(K_REQUEST, KZ, UZ, case="KZ-2026-0042")
    assert reason(check(None, unowned, Role.MISSION, vouchers=())) == Reason.NOT_THE_OWNER


@pytest.mark.parametrize(
    ("kind", "role"),
    [("reminder", Role.NGO), ("return_accepted", Role.NGO), ("reception_confirmed", Role.MISSION)],
)
def test_a_kind_outside_the_senders_role_is_wrong_role(kind: str, role: Role) -> None:
    """Roles come from the directory; a kind the role may not send is refused first."""
    view = opened(UZ, NGO)
    assert reason(check(view, said(kind, NGO, KZ), role, vouchers=())) == Reason.WRONG_ROLE


def test_first_contact_only_from_the_owner_or_the_parent() -> None:
    """A case unknown here is taken from its owner or our parent mission, from nobody else;
    at the routing service, which sees every opening, it is an unknown case."""
    update = said("return_accepted", UZ, KZ, NGO)
    assert check(None, update, Role.MISSION, vouchers=[UZ]) is None
    assert reason(check(None, update, Role.MISSION, vouchers=[])) == Reason.NOT_A_PARTY
    owner = said("travel_arranged", KZ, NGO)
    assert check(None, owner, Role.MISSION, vouchers=[]) is None
    outsider = said("reintegration_update", TJ, NGO)
    assert reason(check(None, outsider, Role.MISSION, vouchers=[UZ])) == Reason.NOT_A_PARTY
    assert reason(check(None, outsider, Role.MISSION)) == Reason.UNKNOWN_CASE


def test_non_parties_and_non_addressees_are_refused() -> None:
    """iom-tj on KZ's case is not a party; an acceptance from one the request did not ask
    is refused even from a party; the owner's kinds come from the owner only."""
    view = opened(UZ)
    intruder = said("reintegration_update", TJ, NGO)
    assert reason(check(view, intruder, Role.MISSION, vouchers=())) == Reason.NOT_A_PARTY
    joined = advance(view, said("return_accepted", UZ, KZ, NGO))
    assert joined is not None and NGO in joined.parties
    answer = said("referral_accepted", NGO, KZ)
    assert reason(check(joined, answer, Role.NGO, vouchers=())) == Reason.NOT_A_PARTY
    withdraw = said("request_withdrawn", UZ, KZ)
    assert reason(check(joined, withdraw, Role.MISSION, vouchers=())) == Reason.NOT_THE_OWNER


def test_consent_bounds_recipients_and_purposes() -> None:
    """A recipient outside share_with or a purpose outside purposes is outside_consent."""
    narrow = Consent(frozenset({KZ}), frozenset({"return_assistance"}))
    request = said(K_REQUEST, KZ, UZ)
    found = check(None, request, Role.MISSION, vouchers=(), consent=narrow)
    assert reason(found) == Reason.OUTSIDE_CONSENT and "does not share with iom-uz" in str(found)
    view = opened(UZ, NGO)
    update = said("reintegration_update", UZ, KZ)
    found = check(view, update, Role.MISSION, vouchers=())
    assert reason(found) == Reason.OUTSIDE_CONSENT and "purpose reintegration" in str(found)
    assert check(view, said("return_accepted", UZ, KZ, NGO), Role.MISSION, vouchers=()) is None


def test_a_withdrawal_halts_everything_but_closing() -> None:
    """After consent_withdrawn a handoff is consent_withdrawn; a close and receipts still go."""
    view = advance(opened(UZ), said("consent_withdrawn", KZ, UZ))
    assert view is not None and view.halted and view.stage is Stage.HALTED
    late = said("travel_arranged", KZ, UZ)
    assert reason(check(view, late, Role.MISSION, vouchers=())) == Reason.CONSENT_WITHDRAWN
    assert check(view, said("case_closed", KZ, UZ), Role.MISSION, vouchers=()) is None
    assert check(view, said("erasure_confirmed", UZ, KZ), Role.MISSION, vouchers=()) is None
    closed = advance(view, said("case_closed", KZ, UZ))
    assert closed is not None and closed.stage is Stage.CLOSED and closed.halted


def test_receipts_match_the_envelope_sent() -> None:
    """A receipt from a non-recipient, for an unknown envelope or with another digest fails."""
    assert check_receipt(UZ, "e1", [UZ, NGO], "d" * 64, "d" * 64) is None
    assert reason(check_receipt(TJ, "e1", [UZ], "d" * 64, "d" * 64)) == Reason.UNMATCHED_RECEIPT
    assert reason(check_receipt(UZ, "e1", None, None, "d" * 64)) == Reason.UNMATCHED_RECEIPT
    assert reason(check_receipt(UZ, "e1", [UZ], "d" * 64, "e" * 64)) == Reason.RECEIPT_MISMATCH


def test_trm_send_refuses_unknown_cases_and_bookkeeping_to_strangers() -> None:
    """`trm send` needs the case known here; confirmations go to parties only."""
    found = check_outgoing(None, said("travel_arranged", KZ, UZ), Role.MISSION)
    assert reason(found) == Reason.UNKNOWN_CASE
    view = opened(UZ)
    stranger = said("erasure_confirmed", KZ, NGO)
    assert reason(check_outgoing(view, stranger, Role.MISSION)) == Reason.NOT_A_PARTY
    named = said("travel_arranged", KZ, UZ, NGO)
    assert check_outgoing(view, named, Role.MISSION) is None


def test_case_views_are_stored_and_read_back(engine: Engine) -> None:
    """A view written (inserted, then updated) reads back equal, on SQLite and PostgreSQL."""
    now = datetime.now(UTC)
    first = opened(UZ)
    with engine.begin() as conn:
        write_views(conn, {CASE: first}, [], now)
    halted = advance(first, said("consent_withdrawn", KZ, UZ))
    assert halted is not None
    with engine.begin() as conn:
        assert read_view(conn, CASE) == first
        write_views(conn, {CASE: halted}, read_views(conn, [CASE]), now)
    with engine.connect() as conn:
        assert read_view(conn, CASE) == halted
        assert read_view(conn, "iom-kz.NOT-KNOWN") is None


@pytest.mark.postgres
def test_a_view_read_to_be_written_is_held_until_that_transaction_ends(postgres_url: str) -> None:
    """The inbox reads a case's view to update it; `trm send` reading it to halt the case
    meanwhile waits instead of reading what the inbox is about to overwrite (a lost halt)."""
    engine = open_database(postgres_url)
    try:
        with engine.begin() as conn:
            write_views(conn, {CASE: opened(UZ)}, [], datetime.now(UTC))
        with engine.begin() as inbox, engine.connect() as sender:
            assert read_view(inbox, CASE, lock=True) == opened(UZ)
            with sender.begin():
                assert read_view(sender, CASE) == opened(UZ)  # a plain read is not held
                sender.exec_driver_sql("SET LOCAL lock_timeout = '50ms'")
                with pytest.raises(OperationalError, match="lock"):
                    read_view(sender, CASE, lock=True)
    finally:
        engine.dispose()


def test_security_doc_lists_the_rules_as_they_are() -> None:
    """docs/security.md's table of who may send what is the policy's own."""
    text = SECURITY.read_text(encoding="utf-8")
    block = text.split("<!-- case-rules:start -->", 1)[1].split("<!-- case-rules:end -->", 1)[0]
    assert block.strip() == rules_table().strip()


def test_an_opening_overtaken_by_a_later_message_still_completes_the_case() -> None:
    """A travel arrangement from the owner that arrives before the request (redelivered, say)
    is taken; the request then arrives and is taken too: it brings the addressees and the
    consent, which are enforced from then on, and the stage reached stays."""
    early = advance(None, said("travel_arranged", KZ, UZ))
    assert early is not None and early.consent is None
    request = said(K_REQUEST, KZ, UZ)
    assert check(early, request, Role.MISSION, vouchers=(), consent=EVERYONE) is None
    done = advance(early, request, EVERYONE)
    assert done is not None
    assert (done.stage, done.addressees, done.consent) == (
        Stage.TRAVEL_ARRANGED,
        frozenset({UZ}),
        EVERYONE,
    )
    again = check(done, said(K_REQUEST, KZ, UZ), Role.MISSION, vouchers=())
    assert reason(again) == Reason.IMPOSSIBLE_TRANSITION
    update = said("reintegration_update", UZ, KZ)
    assert reason(check(done, update, Role.MISSION, vouchers=())) == Reason.OUTSIDE_CONSENT
