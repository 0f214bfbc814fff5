"""The pika transport against a real RabbitMQ: confirms, acks, access control, restarts."""

from __future__ import annotations

import subprocess
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, replace

import pika
import pytest

from broker.errors import (
    AccessRefused,
    BrokerUnavailable,
    LoginRefused,
    PublishFailed,
    TrmError,
    VhostRefused,
)
from broker.management import ManagementClient
from broker.topology import (
    EXCHANGE,
    ROUTING_QUEUE,
    declare,
    inbox_queue,
    provision,
    quarantine_queue,
    queue_depths,
)
from broker.transport import (
    AmqpSettings,
    Consumer,
    Delivery,
    Outgoing,
    Publisher,
    open_connection,
    run_with_reconnect,
    translate,
)

pytestmark = pytest.mark.rabbitmq


@dataclass
class Net:
    """A provisioned vhost: three participants (a, b, routing) and the administrator."""

    vhost: str
    amqp_url: str
    management: ManagementClient
    a: str
    b: str
    routing: str
    passwords: dict[str, str]

    def settings(self, participant_id: str, **extra: object) -> AmqpSettings:
        base = AmqpSettings.from_url(
            self.amqp_url,
            vhost=self.vhost,
            username=participant_id,
            password=self.passwords[participant_id],
        )
        return replace(base, **extra)  # type: ignore[arg-type]

    @property
    def admin(self) -> AmqpSettings:
        return AmqpSettings.from_url(self.amqp_url, vhost=self.vhost)

    def depths(self, *queues: str) -> dict[str, int]:
        return queue_depths(self.admin, queues)


def _provision(rabbitmq_urls: tuple[str, str], vhost: str, delivery_limit: int = 20) -> Net:
    suffix = uuid.uuid4().hex[:8]
    a, b, routing = f"kz-{suffix}", f"uz-{suffix}", f"routing-{suffix}"
    passwords = {p: uuid.uuid4().hex for p in (a, b, routing)}
    management = ManagementClient(rabbitmq_urls[1])
    provision(
        management,
        rabbitmq_urls[0],
        vhost,
        [(a, "mission"), (b, "mission"), (routing, "routing")],
        passwords=passwords,
        delivery_limit=delivery_limit,
    )
    return Net(vhost, rabbitmq_urls[0], management, a, b, routing, passwords)


@pytest.fixture
def net(rabbitmq_urls: tuple[str, str], vhost: str) -> Net:
    return _provision(rabbitmq_urls, vhost)


def _wait_for(condition: Callable[[], bool], seconds: float = 20) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {seconds} s")
        threading.Event().wait(0.05)


def _drain(settings: AmqpSettings, queue: str) -> list[tuple[pika.BasicProperties, bytes]]:
    """Every message now in ``queue``, fetched with basic.get and acked."""
    connection = pika.BlockingConnection(settings.parameters())
    try:
        channel = connection.channel()
        found = []
        while True:
            method, properties, body = channel.basic_get(queue, auto_ack=True)
            if method is None:
                return found
            found.append((properties, body))
    finally:
        connection.close()


# --- settings --------------------------------------------------------------------


def test_settings_from_url_take_parts_and_hide_password() -> None:
    """from_url reads user, password and vhost from the URL and never shows the password."""
    settings = AmqpSettings.from_url("amqp://iom-kz:s3cr%2Ft@broker.example:5673/trm%2Fprod")
    assert (settings.username, settings.password, settings.vhost) == (
        "iom-kz",
        "s3cr/t",
        "trm/prod",
    )
    assert settings.url == "amqp://broker.example:5673"
    assert "s3cr" not in repr(settings)
    assert "s3cr" not in settings.describe()
    override = AmqpSettings.from_url("amqp://guest:guest@h/", vhost="v", username="u", password="p")
    assert (override.vhost, override.username, override.password) == ("v", "u", "p")


def test_settings_take_a_clusters_nodes_comma_separated() -> None:
    """Several URLs give one user, password and vhost (from the first) and every node in turn;
    describe names each node and never the password."""
    settings = AmqpSettings.from_url(
        "amqp://iom-kz:pw-1@rmq1:5672/trm, amqp://rmq2:5673/trm ,amqp://rmq3/"
    )
    assert settings.addresses == ("amqp://rmq1:5672", "amqp://rmq2:5673", "amqp://rmq3:5672")
    assert (settings.username, settings.password, settings.vhost) == ("iom-kz", "pw-1", "trm")
    assert [p.port for p in (settings.parameters(a) for a in settings.addresses)] == [
        5672,
        5673,
        5672,
    ]
    assert settings.describe() == "iom-kz@rmq1:5672,rmq2:5673,rmq3:5672 vhost 'trm'"
    assert "pw-1" not in settings.describe() + repr(settings)


@pytest.mark.parametrize(
    "url",
    [
        "amqp://iom-kz:pw@rmq1/trm,,amqp://rmq2/trm",
        "amqp://iom-kz:pw@rmq1/trm,amqp://iom-uz:pw@rmq2/trm",
        "amqp://iom-kz:pw@rmq1/trm,amqp://rmq2/other",
        "amqp://iom-kz:pw@rmq1/trm,http://rmq2/trm",
    ],
)
def test_settings_refuse_a_node_list_that_is_not_one_cluster(url: str) -> None:
    """An empty address, another user or vhost, or a non-AMQP address in the list is refused
    naming the setting."""
    with pytest.raises(TrmError, match="TRM_AMQP_URL"):
        AmqpSettings.from_url(url)


def test_a_dead_first_node_is_skipped_for_one_that_answers(rabbitmq_urls) -> None:
    """With a node nobody listens on first, a connection reaches the next address and logs
    the node it reached, each time."""
    from structlog.testing import capture_logs

    from broker.transport import open_connection

    live = AmqpSettings.from_url(rabbitmq_urls[0])
    settings = AmqpSettings.from_url(
        f"amqp://{live.username}:{live.password}@127.0.0.1:1/,{live.url}/"
    )
    with capture_logs() as logs:
        first = open_connection(settings)
        first.close()
        second = open_connection(settings)
        second.close()
    reached = [e["node"] for e in logs if e["event"] == "broker node connected"]
    assert reached == [live.url.removeprefix("amqp://")] * 2


def test_settings_refuse_a_non_amqp_url() -> None:
    """A URL that is not amqp:// or amqps:// is refused with a message naming the setting."""
    with pytest.raises(TrmError, match="TRM_AMQP_URL"):
        AmqpSettings.from_url("http://guest:guest@127.0.0.1:5672/")


def test_unreachable_broker_is_unavailable_without_password() -> None:
    """Connecting to a port nobody listens on raises BrokerUnavailable naming host and user."""
    settings = replace(
        AmqpSettings.from_url("amqp://someone:hunter22@127.0.0.1:1/"), connect_timeout=2
    )
    with pytest.raises(BrokerUnavailable, match=r"someone@127\.0\.0\.1:1 ") as caught:
        Publisher(settings, "someone")
    assert "hunter22" not in str(caught.value)


def test_wrong_password_is_login_refused(net: Net) -> None:
    """A login with a wrong password is LoginRefused naming the password file, never the
    password."""
    settings = AmqpSettings.from_url(
        net.amqp_url, vhost=net.vhost, username=net.a, password="not-the-password"
    )
    with pytest.raises(LoginRefused, match="wrong password") as caught:
        Publisher(settings, net.a)
    assert "not-the-password" not in str(caught.value)
    assert net.a in str(caught.value)
    assert "HOME/amqp-password" in str(caught.value)


def test_refused_login_wrapped_by_pika_is_not_unreachable() -> None:
    """A login refusal pika hands over inside an AMQPConnectionError is LoginRefused, not an
    unreachable broker."""
    settings = AmqpSettings.from_url("amqp://someone:hunter22@127.0.0.1:5672/")
    refusal = pika.exceptions.ProbableAuthenticationError("ACCESS_REFUSED - Login was refused")
    error = translate(pika.exceptions.AMQPConnectionError(refusal), settings, "connecting")
    assert isinstance(error, LoginRefused)
    assert "unreachable" not in str(error)


def test_missing_vhost_is_vhost_refused_not_a_password_problem(net: Net) -> None:
    """A right login to a vhost that does not exist is VhostRefused naming the vhost and the
    setting; the password is not blamed."""
    settings = replace(net.admin, vhost=f"{net.vhost}-missing")
    with pytest.raises(VhostRefused, match=r"has no vhost '.*-missing'.*TRM_AMQP_VHOST") as caught:
        open_connection(settings)
    assert "password" not in str(caught.value)


def test_vhost_without_permissions_is_vhost_refused(net: Net) -> None:
    """A right login to a vhost that grants the user nothing is VhostRefused naming the user
    and the vhost; the password is not blamed."""
    other = f"{net.vhost}-other"
    net.management.create_vhost(other)
    try:
        with pytest.raises(VhostRefused, match="holds no permissions on vhost") as caught:
            open_connection(net.settings(net.a, vhost=other))
    finally:
        net.management.delete_vhost(other)
    assert net.a in str(caught.value)
    assert "password" not in str(caught.value)


# --- publishing ------------------------------------------------------------------


def test_one_publish_reaches_both_inboxes_and_routing_once(net: Net) -> None:
    """One publish to two recipients puts exactly one copy in each inbox and in trm.routing."""
    publisher = Publisher(net.settings(net.a), net.a)
    try:
        publisher.publish([Outgoing("env-1", (net.b, net.routing), b"sealed")])
    finally:
        publisher.close()
    queues = (inbox_queue(net.b), inbox_queue(net.routing), ROUTING_QUEUE, inbox_queue(net.a))
    assert net.depths(*queues) == dict(zip(queues, (1, 1, 1, 0), strict=True))
    [(properties, body)] = _drain(net.admin, inbox_queue(net.b))
    assert body == b"sealed"
    assert properties.user_id == net.a
    assert properties.message_id == "env-1"
    assert properties.delivery_mode == 2
    assert properties.headers["CC"] == [net.routing]


def test_windowed_confirms_publish_two_thousand(net: Net) -> None:
    """2,000 messages in one call are all confirmed and all in the recipient's inbox."""
    count = 2000
    messages = [Outgoing(f"env-{i}", (net.b,), b"x" * 1024) for i in range(count)]
    publisher = Publisher(net.settings(net.a, confirm_window=500), net.a)
    try:
        started = time.perf_counter()
        publisher.publish(messages)
        elapsed = time.perf_counter() - started
    finally:
        publisher.close()
    print(f"windowed confirms: {count / elapsed:.0f} msgs/s")
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): count}
    assert net.depths(ROUTING_QUEUE) == {ROUTING_QUEUE: count}


def test_unroutable_publish_names_the_envelope(net: Net) -> None:
    """A mandatory publish nothing is bound for raises PublishFailed naming its id only."""
    connection = pika.BlockingConnection(net.admin.parameters())
    connection.channel().queue_unbind(ROUTING_QUEUE, EXCHANGE, routing_key="#")
    connection.close()
    publisher = Publisher(net.settings(net.a), net.a)
    try:
        with pytest.raises(PublishFailed, match="env-lost") as caught:
            publisher.publish(
                [Outgoing("env-ok", (net.b,), b"1"), Outgoing("env-lost", ("nobody-here",), b"2")]
            )
        assert caught.value.envelope_ids == ("env-lost",)
        publisher.publish([Outgoing("env-after", (net.b,), b"3")])
    finally:
        publisher.close()
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 2}


def test_no_recipients_refused_before_sending(net: Net) -> None:
    """A message without recipients fails the batch before anything is published."""
    publisher = Publisher(net.settings(net.a), net.a)
    try:
        with pytest.raises(PublishFailed, match="no recipients"):
            publisher.publish([Outgoing("env-1", (net.b,), b"1"), Outgoing("env-2", (), b"2")])
    finally:
        publisher.close()
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}


def test_publish_quarantine_carries_reason(net: Net) -> None:
    """publish_quarantine lands in the owner's quarantine queue with reason and detail headers."""
    publisher = Publisher(net.settings(net.b), net.b)
    try:
        publisher.publish_quarantine(
            b"bad", participant_id=net.b, reason="bad_signature", detail="signature by kz-s-1"
        )
    finally:
        publisher.close()
    [(properties, body)] = _drain(net.admin, quarantine_queue(net.b))
    assert body == b"bad"
    assert properties.headers["x-trm-reason"] == "bad_signature"
    assert properties.headers["x-trm-detail"] == "signature by kz-s-1"
    assert properties.user_id == net.b


# --- access control ----------------------------------------------------------------


def test_consuming_another_inbox_is_refused(net: Net) -> None:
    """Participant a consuming b's inbox is refused by RabbitMQ with AccessRefused."""
    consumer = Consumer(net.settings(net.a), inbox_queue(net.b))
    with pytest.raises(AccessRefused, match="403"):
        consumer.run(lambda _d: None, threading.Event())


def test_publishing_as_someone_else_is_refused(net: Net) -> None:
    """a publishing with user_id b is refused by RabbitMQ and nothing is delivered."""
    publisher = Publisher(net.settings(net.a), net.b)
    try:
        with pytest.raises(AccessRefused, match="user_id"):
            publisher.publish([Outgoing("env-forged", (net.b,), b"forged")])
    finally:
        publisher.close()
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}


def test_publishing_to_the_default_exchange_is_refused(net: Net) -> None:
    """a writing straight into b's inbox through the default exchange is refused."""
    publisher = Publisher(net.settings(net.a), net.a, exchange="")
    try:
        with pytest.raises(AccessRefused, match="403"):
            publisher.publish([Outgoing("env-direct", (inbox_queue(net.b),), b"x")])
    finally:
        publisher.close()
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}


def test_declaring_as_a_participant_is_refused(net: Net) -> None:
    """A participant declaring queues (configure permission) is refused with AccessRefused."""
    with pytest.raises(AccessRefused, match="403"):
        declare(net.settings(net.a), [(net.a, "mission")])


def test_participant_may_consume_its_own_queues(net: Net) -> None:
    """The granted permissions suffice to consume one's inbox and quarantine (and routing's)."""
    stop = threading.Event()
    stop.set()
    for participant, queue in (
        (net.b, inbox_queue(net.b)),
        (net.b, quarantine_queue(net.b)),
        (net.routing, ROUTING_QUEUE),
    ):
        consumer = Consumer(net.settings(participant), queue)
        consumer.run(lambda _d: None, stop)
        consumer.close()
    assert net.depths(ROUTING_QUEUE) == {ROUTING_QUEUE: 0}


# --- consuming ----------------------------------------------------------------------


def _publish(net: Net, *ids: str) -> None:
    publisher = Publisher(net.settings(net.a), net.a)
    try:
        publisher.publish([Outgoing(i, (net.b,), f"body {i}".encode()) for i in ids])
    finally:
        publisher.close()


def _run_in_thread(
    consumer: Consumer, handle: Callable[[Delivery], None], stop: threading.Event
) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run(handle, stop)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_consumer_acks_after_handle(net: Net) -> None:
    """Every delivery is handed over with its broker-checked user id and acked afterwards."""
    _publish(net, "env-1", "env-2", "env-3")
    seen: list[Delivery] = []
    stop = threading.Event()
    consumer = Consumer(net.settings(net.b), inbox_queue(net.b))
    thread, errors = _run_in_thread(consumer, seen.append, stop)
    _wait_for(lambda: len(seen) == 3)
    stop.set()
    thread.join(5)
    consumer.close()
    assert not thread.is_alive() and not errors
    assert [d.message_id for d in seen] == ["env-1", "env-2", "env-3"]
    assert {d.user_id for d in seen} == {net.a}
    assert seen[0].body == b"body env-1"
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}


def test_handler_error_redelivers(net: Net) -> None:
    """A handler that raises gets the message again, flagged redelivered, then it is acked."""
    _publish(net, "env-1")
    seen: list[Delivery] = []

    def handle(delivery: Delivery) -> None:
        seen.append(delivery)
        if len(seen) == 1:
            raise TrmError("not now")

    stop = threading.Event()
    consumer = Consumer(net.settings(net.b), inbox_queue(net.b))
    thread, errors = _run_in_thread(consumer, handle, stop)
    _wait_for(lambda: len(seen) >= 2)
    stop.set()
    thread.join(5)
    consumer.close()
    assert not errors
    assert [(d.message_id, d.redelivered) for d in seen] == [("env-1", False), ("env-1", True)]
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}


def test_stop_ends_run_promptly(net: Net) -> None:
    """Setting the stop event makes an idle run return within about half a second."""
    stop = threading.Event()
    consumer = Consumer(net.settings(net.b), inbox_queue(net.b))
    thread, errors = _run_in_thread(consumer, lambda _d: None, stop)
    stop.set()
    started = time.monotonic()
    thread.join(5)
    waited = time.monotonic() - started
    consumer.close()
    print(f"run returned {waited:.2f} s after stop")
    assert not thread.is_alive() and not errors


def test_poison_message_goes_to_quarantine(rabbitmq_urls: tuple[str, str], vhost: str) -> None:
    """A message whose handler always fails is dead-lettered to the quarantine at the limit."""
    net = _provision(rabbitmq_urls, vhost, delivery_limit=2)
    _publish(net, "env-poison")
    attempts: list[Delivery] = []

    def handle(delivery: Delivery) -> None:
        attempts.append(delivery)
        raise ValueError("cannot apply")

    stop = threading.Event()
    consumer = Consumer(net.settings(net.b), inbox_queue(net.b))
    thread, errors = _run_in_thread(consumer, handle, stop)
    try:
        _wait_for(lambda: net.depths(quarantine_queue(net.b))[quarantine_queue(net.b)] == 1)
    finally:
        stop.set()
        thread.join(5)
        consumer.close()
    assert not errors
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}
    assert len(attempts) == 3
    [(properties, _body)] = _drain(net.admin, quarantine_queue(net.b))
    assert properties.message_id == "env-poison"


# --- reconnecting -------------------------------------------------------------------


def test_run_with_reconnect_retries_until_loop_returns() -> None:
    """BrokerUnavailable makes run_with_reconnect call the loop again; a return ends it."""
    calls: list[int] = []

    def loop() -> None:
        calls.append(1)
        if len(calls) < 3:
            raise BrokerUnavailable("down")

    run_with_reconnect(loop, threading.Event(), initial=0.01, maximum=0.02)
    assert len(calls) == 3


def test_run_with_reconnect_lets_other_errors_through() -> None:
    """Errors other than BrokerUnavailable (e.g. AccessRefused) are not retried."""
    calls: list[int] = []

    def loop() -> None:
        calls.append(1)
        raise AccessRefused("no")

    with pytest.raises(AccessRefused):
        run_with_reconnect(loop, threading.Event(), initial=0.01)
    assert len(calls) == 1


def test_run_with_reconnect_stops_on_stop() -> None:
    """A set stop event ends the retries."""
    stop = threading.Event()
    calls: list[int] = []

    def loop() -> None:
        calls.append(1)
        stop.set()
        raise BrokerUnavailable("down")

    run_with_reconnect(loop, stop, initial=0.01)
    assert len(calls) == 1


def _rabbitmqctl(*args: str) -> None:
    subprocess.run(["rabbitmqctl", *args], check=True, capture_output=True, timeout=120)


@pytest.mark.slow
@pytest.mark.exclusive
def test_publisher_survives_broker_restart(net: Net) -> None:
    """With the broker stopped and started mid-stream, every message is confirmed and present."""
    count, batch = 300, 25
    ids = [f"env-{i:03d}" for i in range(count)]
    confirmed: set[str] = set()
    half, resume, stop = threading.Event(), threading.Event(), threading.Event()
    failures: list[BaseException] = []
    settings = net.settings(net.a, connect_timeout=3)
    attempts: list[int] = []

    def loop() -> None:
        attempts.append(1)
        publisher = Publisher(settings, net.a)
        try:
            for start in range(0, count, batch):
                chunk = ids[start : start + batch]
                if set(chunk) <= confirmed:
                    continue
                if start >= count // 2:
                    half.set()
                    resume.wait(60)
                publisher.publish([Outgoing(i, (net.b,), i.encode()) for i in chunk])
                confirmed.update(chunk)
        finally:
            publisher.close()

    def target() -> None:
        try:
            run_with_reconnect(loop, stop, initial=0.2, maximum=2.0)
        except BaseException as e:
            failures.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    try:
        assert half.wait(60)
        _rabbitmqctl("stop_app")
        resume.set()
    finally:
        resume.set()
        _rabbitmqctl("start_app")
        _rabbitmqctl("await_startup")
    thread.join(120)
    stop.set()
    assert not thread.is_alive() and not failures
    assert confirmed == set(ids)
    assert len(attempts) > 1, "the publisher never lost its connection"
    present = {p.message_id for p, _ in _drain(net.admin, inbox_queue(net.b))}
    assert present >= set(ids)


def _run_batches_in_thread(
    consumer: Consumer, handle: Callable[[list[Delivery]], None], stop: threading.Event
) -> tuple[threading.Thread, list[BaseException]]:
    errors: list[BaseException] = []

    def target() -> None:
        try:
            consumer.run_batches(handle, stop, max_batch=4)
        except BaseException as e:
            errors.append(e)

    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread, errors


def test_batches_take_what_is_waiting_and_ack_it_at_once(net: Net) -> None:
    """Waiting deliveries come in batches of at most max_batch, in order; a failed batch
    is redelivered whole; every delivery is acked once its batch is handled."""
    ids = [f"env-{i}" for i in range(10)]
    _publish(net, *ids)
    batches: list[list[Delivery]] = []

    def handle(batch: list[Delivery]) -> None:
        batches.append(batch)
        if len(batches) == 1:
            raise TrmError("not now")

    stop = threading.Event()
    consumer = Consumer(net.settings(net.b), inbox_queue(net.b))
    thread, errors = _run_batches_in_thread(consumer, handle, stop)
    _wait_for(lambda: sum(len(b) for b in batches[1:]) >= 10)
    stop.set()
    thread.join(5)
    consumer.close()
    assert not thread.is_alive() and not errors
    assert all(1 <= len(b) <= 4 for b in batches)
    handled = [d.message_id for b in batches[1:] for d in b]
    assert sorted(handled) == sorted(ids)
    again = {d.message_id for b in batches[1:] for d in b if d.redelivered}
    assert {d.message_id for d in batches[0]} <= again
    assert net.depths(inbox_queue(net.b)) == {inbox_queue(net.b): 0}
