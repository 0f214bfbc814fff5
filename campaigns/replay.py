"""Campaign 6: valid envelopes published a second time, before and after an adapter restart.

Every replayed envelope carries the exact bytes already applied, published
again by its sender's RabbitMQ user (a broker redelivery, a relay resend and
an attacker's replay all look like this). The receiver must recognise every
one as a duplicate: no second inbox row, file or receipt, nothing quarantined.
"""

from __future__ import annotations

import time
from pathlib import Path

from broker.transport import Outgoing, Publisher
from campaigns.checker import RECEIPT_KIND, Party, Status, check, outbox_count, quarantine_rows
from campaigns.network import KZ, UZ, Services, flow_message, scratch_network
from campaigns.report import Row
from trm.localnet import LocalNetwork

_BATCH = 200
_CASES = 50


def _redeliveries(net: LocalNetwork) -> int:
    verdict = check([Party(UZ, net.database_url(UZ))])
    return verdict.redeliveries


def _republish(net: LocalNetwork, envelopes: list[Outgoing]) -> None:
    publisher = Publisher(net.settings(KZ).amqp_settings(), KZ)
    try:
        for start in range(0, len(envelopes), _BATCH):
            publisher.publish(envelopes[start : start + _BATCH])
    finally:
        publisher.close()


def run_replay(root: Path, database: str, services: Services, *, messages: int) -> Row:
    """Send `messages`, then replay them all twice: once live, once after a restart."""
    with scratch_network(root, database, [KZ, UZ], services) as net:
        flow = [flow_message(i, _CASES) for i in range(messages)]
        sealed = [net.send(KZ, kind, to=[UZ], case=case) for kind, case in flow]
        envelopes = [Outgoing(str(s.id), (UZ,), s.raw) for s in sealed]
        sender = net.start_adapter(KZ)
        receiver = net.start_adapter(UZ)
        started = time.monotonic()
        timeout = 120 + messages * 0.1
        net.wait_for(lambda: len(net.inbox_ids(UZ)) >= messages, timeout, "first delivery")
        net.wait_for(lambda: len(net.inbox_ids(KZ)) >= messages, timeout, "receipts")
        files_before = {p.name for p in net.delivered_files(UZ)}
        receipts_before = outbox_count(net.database_url(UZ), RECEIPT_KIND)
        _republish(net, envelopes)
        net.wait_for(lambda: _redeliveries(net) >= messages, timeout, "the first replay")
        net.stop(receiver)
        receiver = net.start_adapter(UZ)
        _republish(net, envelopes)
        net.wait_for(lambda: _redeliveries(net) >= 2 * messages, timeout, "the second replay")
        seconds = time.monotonic() - started
        net.stop(receiver)
        net.stop(sender)
        verdict = check(
            [
                Party(KZ, net.database_url(KZ)),
                Party(UZ, net.database_url(UZ), net.settings(UZ).case_dir),
            ]
        )
        quarantined = quarantine_rows(net.database_url(UZ))
        row = Row("replay", database, messages=verdict.messages(), faults=2 * messages)
        row.ok = verdict.count(Status.OK)
        row.lost = verdict.count(Status.LOST)
        row.duplicated = verdict.count(Status.DUPLICATED)
        row.quarantined = len(quarantined)
        row.add_reasons(q.reason for q in quarantined)
        # UZ's own count: KZ also absorbs the receipts UZ sends again for each replay.
        recognised = _redeliveries(net)
        row.figures.update(
            replayed=2 * messages,
            recognised_as_duplicates=recognised,
            recognised_share=f"{100 * recognised / (2 * messages):.1f}%",
            seconds=round(seconds, 1),
        )
        row.must("100% of replays recognised as duplicates", recognised == 2 * messages)
        row.must("no replay quarantined", not quarantined)
        row.must("no second inbox row", len(net.inbox_ids(UZ)) == messages)
        row.must(
            "no second delivered file",
            {p.name for p in net.delivered_files(UZ)} == files_before
            and len(files_before) == messages,
        )
        row.must(
            "no second receipt",
            outbox_count(net.database_url(UZ), RECEIPT_KIND) == receipts_before == messages,
        )
        row.must("lost 0 and duplicated 0", row.lost == row.duplicated == 0)
        return row
