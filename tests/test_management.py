"""The RabbitMQ management API client: vhosts, users, permissions, queues, errors."""

from __future__ import annotations

import threading
import time
import uuid
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

from broker.errors import AccessRefused, ConfigError, ProvisioningError
from broker.management import ManagementClient
from broker.transport import AmqpSettings


def _with_password(url: str, password: str) -> str:
    parts = urlsplit(url)
    netloc = f"{parts.username}:{password}@{parts.hostname}:{parts.port or 15672}"
    return urlunsplit(parts._replace(netloc=netloc))


def test_url_must_be_http() -> None:
    """A management URL that is not http(s) is refused naming the setting."""
    with pytest.raises(ConfigError, match="TRM_AMQP_MANAGEMENT_URL"):
        ManagementClient("amqp://guest:guest@127.0.0.1:5672/")


def test_url_must_name_a_user() -> None:
    """A management URL without a user is refused naming the setting."""
    with pytest.raises(ConfigError, match="names no user"):
        ManagementClient("http://127.0.0.1:15672/")


def test_repr_hides_password() -> None:
    """The client's repr names host and user but never the password."""
    client = ManagementClient("http://admin:top-secret-9@127.0.0.1:15672/")
    assert "top-secret-9" not in repr(client)
    assert "admin" in repr(client)


def test_unreachable_api_is_provisioning_error() -> None:
    """A management API that does not answer raises ProvisioningError naming the setting."""
    client = ManagementClient("http://guest:hunter22@127.0.0.1:1/", timeout=2)
    with pytest.raises(ProvisioningError, match="does not answer") as caught:
        client.create_vhost("anything")
    assert "hunter22" not in str(caught.value)


@pytest.mark.rabbitmq
def test_wrong_password_is_access_refused(rabbitmq_urls: tuple[str, str]) -> None:
    """A wrong password gives AccessRefused with path and status, without the password."""
    client = ManagementClient(_with_password(rabbitmq_urls[1], "wrong-pass-42"))
    with pytest.raises(AccessRefused, match="401") as caught:
        client.vhost_exists("/")
    assert "/vhosts/%2F" in str(caught.value)
    assert "wrong-pass-42" not in str(caught.value)


@pytest.mark.rabbitmq
def test_vhost_create_and_delete_are_idempotent(rabbitmq_urls: tuple[str, str]) -> None:
    """Creating a vhost twice and deleting it twice both succeed."""
    client = ManagementClient(rabbitmq_urls[1])
    name = f"trm-test-{uuid.uuid4().hex[:12]}"
    try:
        client.create_vhost(name)
        client.create_vhost(name)
        assert client.vhost_exists(name)
    finally:
        client.delete_vhost(name)
    client.delete_vhost(name)
    assert not client.vhost_exists(name)


@pytest.mark.rabbitmq
def test_users_and_permissions(rabbitmq_urls: tuple[str, str], vhost: str) -> None:
    """A user created with permissions can log in to the vhost; once deleted it cannot."""
    client = ManagementClient(rabbitmq_urls[1])
    user = f"mgmt-{uuid.uuid4().hex[:8]}"
    client.put_user(user, "pw-1")
    client.put_user(user, "pw-1")
    client.set_permissions(vhost, user, configure="^$", write="^$", read="^x$")
    assert client.get_permissions(vhost, user) == {"configure": "^$", "write": "^$", "read": "^x$"}
    assert client.vhost_users(vhost) == sorted([user, client.username])
    assert client.user_vhosts(user) == [vhost]
    record = client.get_user(user)
    assert record is not None and record["tags"] in ("", [])
    settings = AmqpSettings.from_url(rabbitmq_urls[0], vhost=vhost, username=user, password="pw-1")
    pika.BlockingConnection(settings.parameters()).close()
    client.delete_user(user)
    client.delete_user(user)
    assert client.get_user(user) is None
    assert client.get_permissions(vhost, user) is None


@pytest.mark.rabbitmq
def test_queue_listing_and_depth(rabbitmq_urls: tuple[str, str], vhost: str) -> None:
    """list_queues and queue_depth report a declared queue and, once sampled, its messages."""
    client = ManagementClient(rabbitmq_urls[1])
    settings = AmqpSettings.from_url(rabbitmq_urls[0], vhost=vhost)
    client.set_permissions(vhost, settings.username, configure=".*", write=".*", read=".*")
    connection = pika.BlockingConnection(settings.parameters())
    try:
        channel = connection.channel()
        channel.queue_declare("q1", durable=True, arguments={"x-queue-type": "quorum"})
        for _ in range(3):
            channel.basic_publish("", "q1", b"m")
    finally:
        connection.close()
    [queue] = client.list_queues(vhost)
    assert (queue.name, queue.type) == ("q1", "quorum")
    deadline = time.monotonic() + 30
    while client.queue_depth(vhost, "q1") != 3:
        assert time.monotonic() < deadline, "the management API never reported 3 messages"
        threading.Event().wait(0.2)
    client.delete_queue(vhost, "q1")
    assert client.get_queue(vhost, "q1") is None
    with pytest.raises(ProvisioningError, match="no queue 'q1'"):
        client.queue_depth(vhost, "q1")
