"""The RabbitMQ management API client: vhosts, users, permissions, queues, errors."""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, HTTPServer
from urllib.parse import urlsplit, urlunsplit

import pika
import pytest

from broker.errors import AccessRefused, ConfigError, LoginRefused, ProvisioningError
from broker.management import ManagementClient, password_matches
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
    client = ManagementClient("http://guest:hunter22@127.0.0.1:1/", timeout=2, retry_delays=())
    with pytest.raises(ProvisioningError, match="does not answer") as caught:
        client.create_vhost("anything")
    assert "TRM_AMQP_MANAGEMENT_URL" in str(caught.value)
    assert "hunter22" not in str(caught.value)


class _Overview(BaseHTTPRequestHandler):
    """Answers every GET with an empty JSON object, as /api/overview would."""

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        """Quiet: the test output is for failures."""


class _LateServer:
    """An HTTP server bound to a port but not yet listening: connections to the port are
    refused until `start`, as while a broker restarts."""

    def __init__(self) -> None:
        self.server = HTTPServer(("127.0.0.1", 0), _Overview, bind_and_activate=False)
        self.server.server_bind()
        self.url = f"http://guest:guest@127.0.0.1:{self.server.server_address[1]}/"
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        self.server.server_activate()
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def close(self) -> None:
        if self._thread is not None:
            self.server.shutdown()
            self._thread.join()
        self.server.server_close()


@contextmanager
def _late_server() -> Iterator[_LateServer]:
    late = _LateServer()
    try:
        yield late
    finally:
        late.close()


def test_restarting_broker_is_ridden_out() -> None:
    """A refused connection is tried again after the first backoff, and the answer comes back."""
    with _late_server() as late:
        waits: list[float] = []

        def broker_comes_back(seconds: float) -> None:
            waits.append(seconds)
            late.start()

        client = ManagementClient(late.url, retry_delays=(0.25, 1), sleep=broker_comes_back)
        assert client.request("GET", "/overview") == {}
    assert waits == [0.25]


def test_broker_that_stays_down_gives_up_after_the_retries() -> None:
    """Refused on every try, the client waits each backoff once, then names the tries."""
    with _late_server() as late:
        waits: list[float] = []
        client = ManagementClient(late.url, retry_delays=(0.25, 0.5, 1), sleep=waits.append)
        with pytest.raises(ProvisioningError, match=r"ConnectionRefusedError, 4 tries over 1.75 s"):
            client.request("GET", "/overview")
    assert waits == [0.25, 0.5, 1]


@pytest.mark.rabbitmq
def test_wrong_password_is_login_refused(rabbitmq_urls: tuple[str, str]) -> None:
    """A wrong password is LoginRefused naming the setting to fix, not a missing tag."""
    client = ManagementClient(_with_password(rabbitmq_urls[1], "wrong-pass-42"))
    with pytest.raises(LoginRefused, match="401") as caught:
        client.vhost_exists("/")
    message = str(caught.value)
    assert "/vhosts/%2F" in message
    assert "password in TRM_AMQP_MANAGEMENT_URL" in message
    assert "administrator tag" not in message
    assert "wrong-pass-42" not in message


@pytest.mark.rabbitmq
def test_user_without_administrator_tag_is_told_the_tag(rabbitmq_urls: tuple[str, str]) -> None:
    """A right login without the administrator tag is AccessRefused naming the tag, not the
    password."""
    admin = ManagementClient(rabbitmq_urls[1])
    user = f"mgmt-{uuid.uuid4().hex[:8]}"
    admin.put_user(user, "pw-tagless", tags="management")
    try:
        parts = urlsplit(rabbitmq_urls[1])
        netloc = f"{user}:pw-tagless@{parts.hostname}:{parts.port or 15672}"
        client = ManagementClient(urlunsplit(parts._replace(netloc=netloc)))
        with pytest.raises(AccessRefused, match="administrator tag") as caught:
            client.create_vhost("never-made")
        assert not isinstance(caught.value, LoginRefused)
    finally:
        admin.delete_user(user)


@pytest.mark.rabbitmq
def test_queues_of_a_missing_vhost_name_the_vhost(rabbitmq_urls: tuple[str, str]) -> None:
    """Listing the queues of a vhost that does not exist names the vhost and the setting."""
    client = ManagementClient(rabbitmq_urls[1])
    with pytest.raises(ProvisioningError, match=r"no vhost 'trm-missing-\w+'.*TRM_AMQP_VHOST"):
        client.list_queues(f"trm-missing-{uuid.uuid4().hex[:8]}")


@pytest.mark.rabbitmq
def test_password_matches_the_stored_hash(rabbitmq_urls: tuple[str, str]) -> None:
    """A user's record matches the password it was given and no other."""
    client = ManagementClient(rabbitmq_urls[1])
    user = f"mgmt-{uuid.uuid4().hex[:8]}"
    client.put_user(user, "pw-right")
    try:
        record = client.get_user(user)
        assert record is not None
        assert password_matches(record, "pw-right")
        assert not password_matches(record, "pw-wrong")
        assert not password_matches({**record, "hashing_algorithm": "unknown"}, "pw-right")
    finally:
        client.delete_user(user)


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


@pytest.mark.rabbitmq
def test_an_unused_user_is_deleted_and_a_granted_one_kept(
    rabbitmq_urls: tuple[str, str], vhost: str
) -> None:
    """`delete_user_if_unused` deletes a user no vhost grants, keeps one a vhost does."""
    client = ManagementClient(rabbitmq_urls[1])
    kept, unused = (f"mgmt-{uuid.uuid4().hex[:8]}" for _ in range(2))
    client.put_user(kept, "pw")
    client.put_user(unused, "pw")
    client.set_permissions(vhost, kept, configure="^$", write="^$", read="^$")
    assert client.delete_user_if_unused(unused) is True
    assert client.get_user(unused) is None
    assert client.delete_user_if_unused(unused) is False
    assert client.delete_user_if_unused(kept) is False
    assert client.get_user(kept) is not None


@pytest.mark.rabbitmq
def test_a_removal_waits_for_a_grant_in_progress_and_keeps_the_user(
    rabbitmq_urls: tuple[str, str], vhost: str
) -> None:
    """The race of two networks sharing a user: one closing, one provisioning.

    The provisioning side holds the users' lock while it finds the user and
    grants it its vhost; the closing side's check-and-delete waits behind it,
    then sees the grant and keeps the user. Without the lock the removal ran
    at once, found the user unused and deleted it under the grant.
    """
    client = ManagementClient(rabbitmq_urls[1])
    user = f"mgmt-{uuid.uuid4().hex[:8]}"
    client.put_user(user, "pw")
    outcome: list[bool] = []
    closing = threading.Thread(
        target=lambda: outcome.append(
            ManagementClient(rabbitmq_urls[1]).delete_user_if_unused(user)
        )
    )
    with client.users_held():
        assert client.get_user(user) is not None
        closing.start()
        closing.join(0.3)
        assert closing.is_alive(), "the removal did not wait for the lock"
        client.set_permissions(vhost, user, configure="^$", write="^$", read="^$")
    closing.join(30)
    assert outcome == [False]
    assert client.get_user(user) is not None
    assert client.user_vhosts(user) == [vhost]
