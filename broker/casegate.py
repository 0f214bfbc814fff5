"""The case protocol at a participant's door: what the inbox lets in.

A `CaseGate` serves one inbox transaction. It reads the case views of the
batch's cases and the outbox rows its receipts answer, judges every opened
envelope against them in arrival order (`admit`), folds each one applied
into its case's view (`take`) and writes the views and the erasures asked
for at the end (`write`), in the transaction that applies the envelopes.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from broker import casepolicy
from broker.casepolicy import Consent, Refusal
from broker.caseviews import read_views, write_views
from broker.database import erasures_table, outbox_table, select_in
from broker.directory import Directory
from broker.envelope import OpenedEnvelope
from broker.errors import UnknownParticipant
from schemas.base import Message
from schemas.control import ConsentWithdrawn, DeliveryReceipt
from schemas.person import ConsentAttestation

_o = outbox_table.c
_SENT = sa.select(_o.envelope_id, _o.digest, _o.recipients).where(
    _o.envelope_id.in_(sa.bindparam("b_ids", expanding=True))
)


def as_message(opened: OpenedEnvelope) -> casepolicy.CaseMessage:
    """What the case protocol judges of an opened envelope."""
    header = opened.header
    return casepolicy.CaseMessage(
        str(header.id), header.kind, header.case, header.sender, tuple(header.recipients)
    )


def consent_of(message: Message) -> Consent | None:
    """The consent scope an opening request carries, else None."""
    attestation = getattr(message, "consent", None)
    if not isinstance(attestation, ConsentAttestation):
        return None
    scope = attestation.scope
    return Consent(frozenset(scope.share_with), frozenset(str(p) for p in scope.purposes))


class CaseGate:
    """Judges a batch of opened envelopes for participant `me`, in one transaction."""

    def __init__(
        self,
        conn: Connection,
        me: str,
        directory: Directory,
        batch: Sequence[OpenedEnvelope],
    ) -> None:
        """Read what the batch's judgement needs: its cases' views and the envelopes receipted."""
        self.me = me
        self.directory = directory
        self.views = read_views(conn, [o.header.case for o in batch], lock=True)
        self._stored = frozenset(self.views)
        self._changed: set[str] = set()
        answered = [
            str(o.message.envelope_id) for o in batch if isinstance(o.message, DeliveryReceipt)
        ]
        self.sent = {
            row.envelope_id: (row.digest, tuple(row.recipients.split()))
            for row in select_in(conn, _SENT, answered)
        }
        parent = directory.participant(me).parent
        self.vouchers = frozenset({parent} if parent else ())
        self.erasures: list[dict[str, object]] = []

    def admit(self, opened: OpenedEnvelope) -> Refusal | None:
        """Why the protocol refuses `opened` here, or None if it may be applied."""
        message = opened.message
        if isinstance(message, DeliveryReceipt):
            sent = self.sent.get(str(message.envelope_id))
            return casepolicy.check_receipt(
                opened.header.sender,
                str(message.envelope_id),
                None if sent is None else sent[1],
                None if sent is None else sent[0],
                message.digest,
            )
        view = self.views.get(opened.header.case)
        return casepolicy.check(
            view,
            as_message(opened),
            self._role(opened.header.sender),
            vouchers=self.vouchers,
            consent=consent_of(opened.message),
        )

    def take(self, opened: OpenedEnvelope, at: datetime) -> None:
        """Fold an applied envelope into its case's view; note the erasure a withdrawal asks."""
        case = opened.header.case
        after = casepolicy.advance(
            self.views.get(case), as_message(opened), consent_of(opened.message)
        )
        if after is not None:
            self.views[case] = after
            self._changed.add(case)
        message = opened.message
        if isinstance(message, ConsentWithdrawn) and message.delete_data:
            self.erasures.append(erasure_row(str(opened.header.id), case, opened.header.sender, at))

    def write(self, conn: Connection, at: datetime) -> None:
        """Store the changed views and the erasures asked for, in `conn`'s transaction."""
        changed = {case: self.views[case] for case in self._changed}
        write_views(conn, changed, self._stored, at)
        if self.erasures:
            conn.execute(erasures_table.insert(), self.erasures)

    def _role(self, participant_id: str) -> str | None:
        try:
            return self.directory.participant(participant_id).role
        except UnknownParticipant:
            return None


def erasure_row(
    withdrawal_id: str, case: str, confirm_to: str | None, at: datetime
) -> dict[str, object]:
    """A pending erasure of `case`'s payloads, confirmed to `confirm_to` once done."""
    return {
        "withdrawal_id": withdrawal_id,
        "case_ref": case,
        "confirm_to": confirm_to,
        "requested_at": at,
        "attempts": 0,
    }
