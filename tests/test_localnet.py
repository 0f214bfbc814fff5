"""The local network harness: homes, provisioning, processes, teardown."""

from __future__ import annotations

import pytest

from broker.management import ManagementClient
from schemas.base import MessageKind
from trm.localnet import DEMO_PARTICIPANTS, local_password

pytestmark = pytest.mark.rabbitmq


def test_network_delivers_and_close_removes_vhost_and_users(local_network, rabbitmq_urls):
    """A fresh network delivers a message between two adapters; close() deletes its vhost
    and the users no other vhost uses."""
    net = local_network()
    assert set(net.participants) == {p for p, *_ in DEMO_PARTICIPANTS}
    for home in net.participants.values():
        assert (home / "directory.json").exists()
        assert (home / "amqp-password").stat().st_mode & 0o077 == 0
    kz, uz = net.start_adapter("iom-kz"), net.start_adapter("iom-uz")
    sealed = net.send("iom-kz", MessageKind.RETURN_REQUEST, to=["iom-uz"], case="iom-kz.KZ-LN-0001")
    net.wait_for(lambda: str(sealed.id) in net.inbox_ids("iom-uz"), 30, "the request at iom-uz")
    assert [p.stem for p in net.delivered_files("iom-uz")] == [str(sealed.id)]
    net.wait_for(lambda: net.outbox_pending("iom-kz") == 0, 10, "the outbox to drain")
    assert net.stop(kz) == 0
    assert net.stop(uz) == 0
    client = ManagementClient(rabbitmq_urls[1])
    net.close()
    assert not client.vhost_exists(net.vhost)
    for participant_id in net.participants:
        if client.get_user(participant_id) is not None:
            assert client.user_vhosts(participant_id), participant_id


def test_passwords_are_shared_by_networks_on_one_broker(local_network):
    """Two networks with the same ids give each participant the same password, so running
    them at once never locks the other out."""
    first, second = local_network(), local_network()
    assert first.vhost != second.vhost
    for participant_id in first.participants:
        a = (first.home(participant_id) / "amqp-password").read_text().strip()
        b = (second.home(participant_id) / "amqp-password").read_text().strip()
        assert a == b == local_password(first.management_url, participant_id)


def test_wait_for_names_what_it_waited_for(local_network):
    """wait_for raises TimeoutError naming the condition."""
    net = local_network()
    with pytest.raises(TimeoutError, match="the impossible"):
        net.wait_for(lambda: False, 0.2, "the impossible")
