"""The pika transport: connections, windowed publisher confirms, acking consumers.

Everything that talks AMQP goes through here, and every pika exception is
translated at this boundary into `BrokerUnavailable` (retry later),
`AccessRefused` (an operator must fix users or permissions: `LoginRefused`
for a wrong user or password, `VhostRefused` for a vhost that is missing or
grants the user nothing), `PublishFailed` (returned or nacked messages) or
`ProvisioningError` (a queue is missing).
Messages name the host, vhost and user, never the password. Logs carry
envelope ids and participant ids, never message bodies.

Publisher confirms are windowed: up to ``confirm_window`` messages are in
flight at once and the broker's (multiple-)acks retire them as they come.
pika's `BlockingChannel.confirm_delivery` would instead block every publish
for its own confirm, one network round trip per message. pika has no public
blocking API for asynchronous confirms, so the publisher registers its
confirm and return callbacks on the blocking channel's underlying
asynchronous channel and drives the I/O loop until its own condition holds;
those few private touch points live in `_Confirms` and `_pump_until`.
"""

from __future__ import annotations

import random
import ssl
import threading
import time
import traceback
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import unquote, urlsplit

import pika
import pika.exceptions
import pika.spec
import structlog
from pika.adapters.blocking_connection import BlockingChannel

from broker.errors import (
    AccessRefused,
    BrokerUnavailable,
    ConfigError,
    LocalUnavailable,
    LoginRefused,
    ProvisioningError,
    PublishFailed,
    TransportError,
    TrmError,
    VhostRefused,
)
from broker.faults import armed, fault_point
from broker.metrics import CONNECTIONS
from broker.topology import EXCHANGE, QUARANTINE_EXCHANGE

_log = structlog.get_logger(__name__)

DEFAULT_AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"
"""The local broker's administrator: a default for the demo and tests only."""
_DEFAULT_PORTS = {"amqp": 5672, "amqps": 5671}
_PERSISTENT: Literal[2] = 2


@dataclass(frozen=True)
class AmqpSettings:
    """Where and as whom to connect to RabbitMQ.

    ``url`` is ``amqp://host:port`` or ``amqps://host:port``; credentials in it
    are ignored here (use `from_url` to take them from a URL). ``fallbacks``
    are more nodes of the same cluster, tried in turn when ``url`` does not
    answer (see `open_connection`).
    """

    url: str
    vhost: str
    username: str
    password: str = field(repr=False)
    heartbeat: int = 30
    prefetch: int = 200
    confirm_window: int = 500
    connect_timeout: float = 10
    fallbacks: tuple[str, ...] = ()

    @classmethod
    def from_url(
        cls,
        url: str,
        *,
        vhost: str | None = None,
        username: str | None = None,
        password: str | None = None,
    ) -> AmqpSettings:
        """Settings from an AMQP URL, or several separated by commas; keyword arguments
        override their parts.

        Several URLs name the nodes of one cluster: the user, password and
        vhost come from the first, and a later URL may not name others.
        """
        urls = [part.strip() for part in url.split(",")]
        if not all(urls):
            raise ConfigError(
                f"TRM_AMQP_URL / --amqp-url holds an empty address in {len(urls)} "
                "comma-separated ones: give amqp://host:5672/vhost,amqp://host2:5672/vhost"
            )
        first = _parse_url(urls[0])
        user = username if username is not None else first.user
        secret = password if password is not None else first.password
        if not user:
            raise ConfigError(f"no RabbitMQ user given for {first.address}: set it in the URL")
        chosen_vhost = vhost if vhost is not None else first.vhost
        others = [_parse_url(other) for other in urls[1:]]
        for other in others:
            if (other.user and other.user != first.user) or (
                other.path_given and other.vhost != first.vhost
            ):
                raise ConfigError(
                    f"the AMQP addresses {first.address} and {other.address} name another user "
                    "or vhost: every address in TRM_AMQP_URL / --amqp-url is a node of the same "
                    "cluster, logged in to as the same user on the same vhost"
                )
        return cls(
            url=first.address,
            vhost=chosen_vhost,
            username=user,
            password=secret,
            fallbacks=tuple(dict.fromkeys(o.address for o in others if o.address != first.address)),
        )

    @property
    def addresses(self) -> tuple[str, ...]:
        """Every node address, ``url`` first."""
        return (self.url, *self.fallbacks)

    def describe(self) -> str:
        """``user@host:port vhost V`` (every node, comma-separated): for messages and logs."""
        return f"{self.username}@{','.join(map(_host_port, self.addresses))} vhost {self.vhost!r}"

    def parameters(self, address: str | None = None) -> pika.ConnectionParameters:
        """pika connection parameters for ``address`` (``url`` when not given): heartbeats
        on, one attempt, bounded timeouts."""
        parts = urlsplit(address or self.url)
        if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
            raise ConfigError(f"AMQP URL must be amqp://host:port, got scheme {parts.scheme!r}")
        ssl_options = None
        if parts.scheme == "amqps":
            ssl_options = pika.SSLOptions(ssl.create_default_context(), parts.hostname)
        return pika.ConnectionParameters(
            host=parts.hostname,
            port=parts.port or _DEFAULT_PORTS[parts.scheme],
            virtual_host=self.vhost,
            credentials=pika.PlainCredentials(self.username, self.password),
            heartbeat=self.heartbeat,
            connection_attempts=1,
            socket_timeout=self.connect_timeout,
            stack_timeout=self.connect_timeout,
            blocked_connection_timeout=max(60.0, self.connect_timeout),
            ssl_options=ssl_options,
        )


@dataclass(frozen=True)
class _ParsedUrl:
    address: str
    user: str
    password: str
    vhost: str
    path_given: bool


def _parse_url(url: str) -> _ParsedUrl:
    parts = urlsplit(url)
    if parts.scheme not in _DEFAULT_PORTS or not parts.hostname:
        raise ConfigError(
            f"TRM_AMQP_URL / --amqp-url must look like amqp://host:5672/vhost, "
            f"got scheme {parts.scheme!r}"
        )
    path = parts.path[1:] if parts.path.startswith("/") else parts.path
    port = parts.port or _DEFAULT_PORTS[parts.scheme]
    return _ParsedUrl(
        address=f"{parts.scheme}://{parts.hostname}:{port}",
        user=unquote(parts.username or ""),
        password=unquote(parts.password or ""),
        vhost=unquote(path) or "/",
        path_given=bool(path),
    )


def _host_port(address: str) -> str:
    parts = urlsplit(address)
    return f"{parts.hostname}:{parts.port or _DEFAULT_PORTS.get(parts.scheme, 5672)}"


@dataclass(frozen=True)
class Outgoing:
    """One sealed envelope to publish: its id, its recipients, its exact bytes."""

    envelope_id: str
    recipients: tuple[str, ...]
    body: bytes


@dataclass(frozen=True)
class Delivery:
    """One message as RabbitMQ delivered it; ``user_id`` is broker-validated."""

    body: bytes
    user_id: str | None
    message_id: str | None
    redelivered: bool
    headers: Mapping[str, Any]
    delivery_tag: int


# --- errors ------------------------------------------------------------------


def translate(error: BaseException, settings: AmqpSettings, doing: str) -> TrmError:
    """The `TrmError` for a pika (or socket) error met while ``doing`` something.

    The caller raises it ``from`` the original error.
    """
    where = settings.describe()
    if isinstance(error, TrmError):
        return error
    if isinstance(error, pika.exceptions.ChannelClosedByBroker):
        return _channel_error(error.reply_code, error.reply_text, where, doing)
    refused = _refusal(error)
    if refused is not None:
        return _refused(refused, settings, doing)
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
        return BrokerUnavailable(
            f"RabbitMQ closed the connection of {where} while {doing} "
            f"({error.reply_code} {error.reply_text}); retry when it is back"
        )
    if isinstance(error, pika.exceptions.AMQPError | OSError):
        kind = type(error).__name__
        return BrokerUnavailable(
            f"RabbitMQ at {where} is unreachable or dropped the connection while {doing} "
            f"({kind}); check that it runs and TRM_AMQP_URL points at it, then retry"
        )
    return TransportError(f"unexpected {type(error).__name__} from pika while {doing} at {where}")


_LOGIN_ERRORS = (
    pika.exceptions.ProbableAuthenticationError,
    pika.exceptions.AuthenticationError,
    pika.exceptions.ProbableAccessDeniedError,
)


def _refusal(error: BaseException) -> BaseException | None:
    """The login or vhost refusal in ``error``, or None.

    pika wraps some connection failures in an `AMQPConnectionError` whose
    arguments hold the real cause; a refusal there must not pass for an
    unreachable broker.
    """
    if isinstance(error, _LOGIN_ERRORS):
        return error
    if isinstance(error, pika.exceptions.ConnectionClosedByBroker):
        return error if error.reply_code in (403, 530) else None
    if isinstance(error, pika.exceptions.AMQPConnectionError):
        for cause in error.args:
            if isinstance(cause, BaseException) and cause is not error:
                found = _refusal(cause)
                if found is not None:
                    return found
    return None


def _refused(error: BaseException, settings: AmqpSettings, doing: str) -> AccessRefused:
    """`LoginRefused` for a wrong user or password, `VhostRefused` for the vhost."""
    where = settings.describe()
    text = str(error)
    vhost_refused = isinstance(error, pika.exceptions.ProbableAccessDeniedError) or (
        isinstance(error, pika.exceptions.ConnectionClosedByBroker) and error.reply_code == 530
    )
    if not vhost_refused:
        return LoginRefused(
            f"RabbitMQ refused the login of {where} while {doing}: wrong password, or no "
            f"user {settings.username!r}. Give the password trm broker provision set "
            "(a participant's HOME/amqp-password or TRM_AMQP_PASSWORD_FILE, an "
            "administrator's in TRM_AMQP_URL), or run trm broker provision to create the user"
        )
    if "not found" in text:
        return VhostRefused(
            f"RabbitMQ accepted the login of {where} but has no vhost {settings.vhost!r} "
            f"(while {doing}). Check TRM_AMQP_VHOST / --vhost, or run trm broker provision "
            "to create the vhost"
        )
    return VhostRefused(
        f"RabbitMQ accepted the login of {where} but user {settings.username!r} holds no "
        f"permissions on vhost {settings.vhost!r} (while {doing}). Check TRM_AMQP_VHOST / "
        "--vhost, or run trm broker provision for that vhost with the participant in "
        "its directory"
    )


def _channel_error(code: int, text: str, where: str, doing: str) -> TrmError:
    if code == 403 or (code == 406 and "user_id" in text):
        return AccessRefused(
            f"RabbitMQ refused {doing} for {where}: {code} {text}; a participant may only "
            "publish to trm.handoff as itself and read its own queues"
        )
    if code == 404:
        return ProvisioningError(
            f"RabbitMQ has no such queue or exchange for {where} while {doing}: {text}; "
            "run trm broker provision"
        )
    return TransportError(f"RabbitMQ closed the channel of {where} while {doing}: {code} {text}")


_PIKA_ERRORS = (pika.exceptions.AMQPError, OSError)


_reached: dict[tuple[str, ...], str] = {}
"""The node each list of addresses last reached: tried first next time."""
_reached_lock = threading.Lock()


def open_connection(settings: AmqpSettings) -> pika.BlockingConnection:
    """A new blocking connection, or `BrokerUnavailable` / `AccessRefused`.

    With several addresses pika tries each in turn, starting from the node
    this process last reached with them, so that a reconnection after a node
    is lost goes straight to one that answered, and a dead node costs its
    connect timeout once, not on every reconnection.
    """
    addresses = settings.addresses
    with _reached_lock:
        last = _reached.get(addresses)
    order = list(addresses)
    if last in order:
        start = order.index(last)
        order = order[start:] + order[:start]
    try:
        connection = pika.BlockingConnection([settings.parameters(a) for a in order])
    except _PIKA_ERRORS as e:
        raise translate(e, settings, "connecting") from e
    params = connection._impl.params  # type: ignore[attr-defined]  # the node reached
    node = f"{params.host}:{params.port}"
    if len(addresses) > 1:
        with _reached_lock:
            previous = _reached.get(addresses)
            _reached[addresses] = next(a for a in order if _host_port(a) == node)
        if previous is not None and _host_port(previous) != node:
            _log.warning("broker node changed", node=node, previous=_host_port(previous))
        else:
            _log.info("broker node connected", node=node)
    CONNECTIONS.opened(connection, params.host, params.port)
    return connection


def _close_quietly(connection: pika.BlockingConnection | None) -> None:
    if connection is None or connection.is_closed:
        return
    try:
        connection.close()
    except _PIKA_ERRORS:
        # Already broken: there is nothing left to close cleanly.
        return


# --- publishing ----------------------------------------------------------------


@dataclass
class _Confirms:
    """Publish sequence numbers in flight and what the broker said about them."""

    next_tag: int = 1
    pending: dict[int, str] = field(default_factory=dict)
    nacked: list[str] = field(default_factory=list)
    returned: list[str] = field(default_factory=list)

    def on_confirm(self, frame: Any) -> None:
        method = frame.method
        tag: int = method.delivery_tag
        if method.multiple:
            done = [t for t in self.pending if t <= tag]
        else:
            done = [tag] if tag in self.pending else []
        for t in done:
            label = self.pending.pop(t)
            if isinstance(method, pika.spec.Basic.Nack):
                self.nacked.append(label)

    def on_return(
        self,
        _channel: Any,
        _method: pika.spec.Basic.Return,
        properties: pika.spec.BasicProperties,
        _body: bytes,
    ) -> None:
        self.returned.append(properties.message_id or "(no id)")


@dataclass(frozen=True)
class _Frame:
    exchange: str
    routing_key: str
    body: bytes
    properties: pika.BasicProperties
    label: str


class Publisher:
    """Publishes persistent, mandatory messages with windowed confirms.

    One connection and one channel in confirm mode; use it from one thread.
    A lost connection raises `BrokerUnavailable`; the next `publish`
    reconnects.
    """

    def __init__(
        self, settings: AmqpSettings, participant_id: str, *, exchange: str = EXCHANGE
    ) -> None:
        self._settings = settings
        self._participant = participant_id
        self._exchange = exchange
        self._log = _log.bind(participant=participant_id)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._confirms = _Confirms()
        self._connect()

    def _connect(self) -> None:
        connection = open_connection(self._settings)
        try:
            channel = connection.channel()
            confirms = _Confirms()
            selected: list[bool] = []
            impl = channel._impl  # type: ignore[attr-defined]
            impl.add_on_return_callback(confirms.on_return)
            impl.confirm_delivery(
                ack_nack_callback=confirms.on_confirm,
                callback=lambda _frame: selected.append(True),
            )
            self._connection, self._channel = connection, channel
            self._pump_until(
                lambda: bool(selected), time.monotonic() + self._settings.connect_timeout
            )
        except BaseException as e:
            self._drop()
            _close_quietly(connection)
            if isinstance(e, _PIKA_ERRORS):
                raise translate(e, self._settings, "opening a confirm channel") from e
            raise
        self._confirms = confirms

    def _drop(self) -> None:
        _close_quietly(self._connection)
        self._connection = None
        self._channel = None

    def _pump_until(self, done: Callable[[], bool], deadline: float) -> None:
        """Drive I/O until ``done()`` holds; `BrokerUnavailable` at ``deadline``."""
        assert self._connection is not None and self._channel is not None
        expired: list[bool] = []
        remaining = max(0.0, deadline - time.monotonic())
        ioloop = self._connection._impl.ioloop  # type: ignore[attr-defined]
        timer = ioloop.call_later(remaining, lambda: expired.append(True))
        try:
            self._channel._flush_output(lambda: bool(expired), done)  # type: ignore[attr-defined]
        finally:
            ioloop.remove_timeout(timer)
        if self._channel.is_closed or self._connection.is_closed:
            raise pika.exceptions.StreamLostError("the channel closed while waiting")
        if not done():
            raise BrokerUnavailable(
                f"RabbitMQ at {self._settings.describe()} sent no confirm in time: a quorum "
                "queue confirms nothing while a majority of its cluster's nodes is down (or the "
                "broker is overloaded); the batch will be published again"
            )

    def publish(self, messages: Sequence[Outgoing], timeout: float = 30) -> None:
        """Publish every message and return once the broker confirmed them all.

        Raises `PublishFailed` naming the envelope ids returned as unroutable
        or nacked, `BrokerUnavailable` when the connection is lost or no
        confirm came within ``timeout`` seconds (publish the batch again
        later), `AccessRefused` when the user may not publish so.
        """
        frames = [self._frame(m) for m in messages]
        self._send(frames, timeout, "publishing envelopes", fault="relay.after_publish")
        self._log.debug("published", count=len(frames))

    def publish_quarantine(
        self, body: bytes, *, participant_id: str, reason: str, detail: str
    ) -> None:
        """Put a message that failed opening into ``participant_id``'s quarantine.

        ``reason`` is a `TrmError.reason`; ``detail`` is an operator message
        and must not contain payload data.
        """
        properties = pika.BasicProperties(
            delivery_mode=_PERSISTENT,
            user_id=self._participant,
            headers={"x-trm-reason": reason, "x-trm-detail": detail},
        )
        frame = _Frame(QUARANTINE_EXCHANGE, participant_id, body, properties, "quarantine")
        self._send([frame], 30, "publishing to the quarantine")
        self._log.info("quarantined", owner=participant_id, reason=reason)

    def requeue(
        self,
        body: bytes,
        *,
        recipient: str,
        envelope_id: str | None,
        headers: Mapping[str, str],
    ) -> None:
        """Publish a quarantined envelope's exact bytes to ``recipient``'s inbox again.

        The quarantine's own (`broker.quarantine.requeue`); ``headers`` say
        who first published it.
        """
        properties = pika.BasicProperties(
            delivery_mode=_PERSISTENT,
            user_id=self._participant,
            message_id=envelope_id,
            content_type="application/octet-stream",
            headers=dict(headers),
        )
        frame = _Frame(self._exchange, recipient, body, properties, envelope_id or "requeue")
        self._send([frame], 30, "requeueing from the quarantine")
        self._log.info("requeued", envelope_id=envelope_id)

    def _frame(self, message: Outgoing) -> _Frame:
        if not message.recipients:
            raise PublishFailed(
                f"envelope {message.envelope_id} has no recipients; nothing was published",
                (message.envelope_id,),
            )
        headers: dict[str, Any] | None = (
            {"CC": list(message.recipients[1:])} if len(message.recipients) > 1 else None
        )
        properties = pika.BasicProperties(
            delivery_mode=_PERSISTENT,
            user_id=self._participant,
            message_id=message.envelope_id,
            content_type="application/octet-stream",
            headers=headers,
        )
        return _Frame(
            self._exchange, message.recipients[0], message.body, properties, message.envelope_id
        )

    def _send(
        self, frames: Sequence[_Frame], timeout: float, doing: str, fault: str | None = None
    ) -> None:
        if not frames:
            return
        deadline = time.monotonic() + timeout
        try:
            if self._channel is None or self._channel.is_closed:
                self._drop()
                self._connect()
            assert self._channel is not None
            confirms = self._confirms
            confirms.nacked.clear()
            confirms.returned.clear()
            window = max(1, self._settings.confirm_window)
            # The channel's own basic_publish writes to the socket and polls for
            # input once per message; the frames are queued on the connection
            # instead and go out together at the next pump.
            impl = self._channel._impl  # type: ignore[attr-defined]
            for frame in frames:
                if len(confirms.pending) >= window:
                    self._pump_until(lambda: len(confirms.pending) < window, deadline)
                confirms.pending[confirms.next_tag] = frame.label
                confirms.next_tag += 1
                impl.basic_publish(
                    frame.exchange,
                    frame.routing_key,
                    frame.body,
                    frame.properties,
                    mandatory=True,
                )
            if fault is not None and armed(fault):
                # Handed to RabbitMQ, confirms not yet awaited (reliability campaigns):
                # the queued frames are written first, which only a kill here needs.
                self._pump_until(lambda: True, deadline)
                fault_point(fault)
            self._pump_until(lambda: not confirms.pending, deadline)
        except BrokerUnavailable:
            self._drop()
            raise
        except _PIKA_ERRORS as e:
            self._drop()
            error = translate(e, self._settings, doing)
            self._log.warning("publish failed", reason=error.reason, count=len(frames))
            raise error from e
        failed = tuple(dict.fromkeys([*confirms.returned, *confirms.nacked]))
        if failed:
            self._log.warning("publish refused", envelope_ids=list(failed))
            raise PublishFailed(
                f"RabbitMQ returned as unroutable or nacked {len(failed)} of {len(frames)} "
                f"messages ({', '.join(failed)}); check that every recipient's inbox is "
                "provisioned (trm broker provision)",
                failed,
            )

    def close(self) -> None:
        """Close the connection; safe to call twice."""
        self._drop()


# --- consuming -----------------------------------------------------------------


class Consumer:
    """Consumes one queue with manual acks and a prefetch window; one thread.

    A handler that raises `LocalUnavailable` (its database or case system is
    down) is not handed the same deliveries back at once: the consumer
    cancels its subscription, keeps the batch in hand unacknowledged and
    tries it again after a bounded exponential wait with jitter
    (`hold_initial` doubling to `hold_maximum` seconds), then consumes again
    once the handler took it. Nothing is redelivered meanwhile, so nothing
    counts towards the queue's delivery limit.
    """

    POLL_SECONDS = 0.5
    HOLD_INITIAL_SECONDS = 0.5
    HOLD_MAXIMUM_SECONDS = 30.0

    def __init__(
        self,
        settings: AmqpSettings,
        queue: str,
        *,
        hold_initial: float = HOLD_INITIAL_SECONDS,
        hold_maximum: float = HOLD_MAXIMUM_SECONDS,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._hold_initial = hold_initial
        self._hold_maximum = hold_maximum
        self._log = _log.bind(queue=queue, user=settings.username)
        self._connection: pika.BlockingConnection | None = None
        self._channel: BlockingChannel | None = None
        self._connect()

    def _connect(self) -> None:
        connection = open_connection(self._settings)
        try:
            channel = connection.channel()
            channel.basic_qos(prefetch_count=self._settings.prefetch)
        except _PIKA_ERRORS as e:
            _close_quietly(connection)
            raise translate(e, self._settings, f"opening a channel for {self._queue}") from e
        self._connection, self._channel = connection, channel

    def run(self, handle: Callable[[Delivery], None], stop: threading.Event) -> None:
        """Hand each delivery to ``handle``; ack when it returns, nack+requeue if it raises.

        Returns soon (within about half a second) after ``stop`` is set.
        Raises `BrokerUnavailable` when the connection drops, `AccessRefused`
        when the user may not read the queue.
        """
        self.run_batches(lambda batch: handle(batch[0]), stop, max_batch=1)

    def run_batches(
        self,
        handle: Callable[[list[Delivery]], None],
        stop: threading.Event,
        max_batch: int = 100,
    ) -> None:
        """Hand ``handle`` every delivery already waiting (up to ``max_batch``) at once.

        One multiple-ack retires the batch when ``handle`` returns; if it
        raises `LocalUnavailable` the batch is held and tried again with
        backoff (see the class), if it raises anything else the whole batch
        is nacked and requeued. A batch never waits for more deliveries: it
        is what the prefetch window already brought, so a trickle is handled
        one by one with no added latency. Otherwise as `run`.
        """
        try:
            if self._channel is None or self._channel.is_closed:
                self.close()
                self._connect()
            channel = self._channel
            assert channel is not None
            while self._consume(channel, handle, stop, max_batch):
                pass
        except pika.exceptions.ChannelClosedByBroker as e:
            self.close()
            if e.reply_code == 406 and "timed out" in e.reply_text:
                # RabbitMQ's consumer_timeout took a held batch back: consume it again.
                raise BrokerUnavailable(
                    f"RabbitMQ took back the deliveries held on {self._queue} "
                    f"({e.reply_code} {e.reply_text}); consuming again"
                ) from e
            raise translate(e, self._settings, f"consuming {self._queue}") from e
        except _PIKA_ERRORS as e:
            self.close()
            raise translate(e, self._settings, f"consuming {self._queue}") from e

    def _consume(
        self,
        channel: BlockingChannel,
        handle: Callable[[list[Delivery]], None],
        stop: threading.Event,
        max_batch: int,
    ) -> bool:
        """Consume until ``stop`` (False), or until a held batch was taken (True: consume again)."""
        stream = channel.consume(self._queue, inactivity_timeout=self.POLL_SECONDS)
        for method, properties, body in stream:
            if stop.is_set():
                break
            if method is None or properties is None:
                continue
            batch = [_delivery(method, properties, body or b"")]
            _gather(channel, stream, batch, max_batch)
            unavailable = self._dispatch_batch(channel, handle, batch)
            if unavailable is not None:
                # Nothing more is delivered while the handler is down; what the
                # prefetch window brought beyond the batch goes back to the queue.
                channel.cancel()
                return self._hold(channel, handle, batch, stop, unavailable)
        channel.cancel()
        return False

    def _dispatch_batch(
        self,
        channel: BlockingChannel,
        handle: Callable[[list[Delivery]], None],
        batch: list[Delivery],
    ) -> LocalUnavailable | None:
        """Hand over `batch` and settle it; the error, unsettled, if the handler is down."""
        last = batch[-1].delivery_tag
        try:
            handle(batch)
        except LocalUnavailable as e:
            return e
        except TrmError as e:
            self._log.warning("handler refused a batch; requeued", reason=e.reason, size=len(batch))
            channel.basic_nack(last, multiple=True, requeue=True)
            return None
        except Exception as e:
            self._failed(e, len(batch))
            channel.basic_nack(last, multiple=True, requeue=True)
            return None
        channel.basic_ack(last, multiple=True)
        return None

    def _hold(
        self,
        channel: BlockingChannel,
        handle: Callable[[list[Delivery]], None],
        batch: list[Delivery],
        stop: threading.Event,
        error: LocalUnavailable,
    ) -> bool:
        """Keep `batch` unacked and try it again with backoff until taken; True once it is.

        The connection is kept alive meanwhile (pika's sleep answers
        heartbeats). On `stop` the batch is nacked back to the queue and
        False returned.
        """
        last = batch[-1].delivery_tag
        backoff = Backoff(self._hold_initial, self._hold_maximum)
        attempt = 0
        while True:
            attempt += 1
            wait = backoff.next()
            self._log.warning(
                "local side unavailable; holding the batch",
                reason=error.reason,
                error=str(error),
                attempt=attempt,
                wait_seconds=round(wait, 2),
                size=len(batch),
            )
            if not self._sleep(wait, stop):
                channel.basic_nack(last, multiple=True, requeue=True)
                return False
            if channel.is_closed:
                raise BrokerUnavailable(
                    f"the channel consuming {self._queue} closed while a batch was held; "
                    "its deliveries went back to the queue"
                )
            try:
                handle(batch)
            except LocalUnavailable as e:
                error = e
                continue
            except Exception as e:
                self._failed(e, len(batch))
                channel.basic_nack(last, multiple=True, requeue=True)
                return True
            channel.basic_ack(last, multiple=True)
            self._log.info("local side back; batch taken", attempts=attempt, size=len(batch))
            return True

    def _sleep(self, seconds: float, stop: threading.Event) -> bool:
        """Wait `seconds` while answering the broker; False if `stop` was set meanwhile."""
        assert self._connection is not None
        deadline = time.monotonic() + seconds
        while not stop.is_set():
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return True
            self._connection.sleep(min(remaining, self.POLL_SECONDS))
        return False

    def _failed(self, error: Exception, size: int) -> None:
        # Log the type and where it was raised, never str(e): driver errors may quote data.
        frame = traceback.extract_tb(error.__traceback__)[-1]
        self._log.error(
            "handler failed; batch requeued",
            error=type(error).__name__,
            at=f"{frame.filename}:{frame.lineno}",
            size=size,
        )

    def close(self) -> None:
        """Close the connection (unacked deliveries go back to the queue)."""
        _close_quietly(self._connection)
        self._connection = None
        self._channel = None


def _gather(
    channel: BlockingChannel,
    stream: Iterator[tuple[Any, Any, Any]],
    batch: list[Delivery],
    max_batch: int,
) -> None:
    """Add to `batch` the deliveries that have already arrived, up to `max_batch` in all.

    pika reads at most 100 KB from the socket per read event, about 27
    envelopes of 3.7 KB, so the socket is read again, without waiting, until
    `_IDLE_READS` reads in a row bring nothing (the first read after a
    blocking one often brings nothing though more has arrived): a batch then
    takes what the prefetch window brought, not one read's worth.
    """
    idle_reads = 0
    while len(batch) < max_batch:
        waiting = channel.get_waiting_message_count()
        if waiting:
            idle_reads = 0
            for _ in range(min(waiting, max_batch - len(batch))):
                method, properties, body = next(stream)
                if method is None or properties is None:
                    return
                batch.append(_delivery(method, properties, body or b""))
        elif idle_reads == _IDLE_READS:
            return
        else:
            idle_reads += 1
            channel.connection.process_data_events(time_limit=0)


_IDLE_READS = 2


def _delivery(
    method: pika.spec.Basic.Deliver, properties: pika.spec.BasicProperties, body: bytes
) -> Delivery:
    return Delivery(
        body=body,
        user_id=properties.user_id,
        message_id=properties.message_id,
        redelivered=bool(method.redelivered),
        headers=dict(properties.headers or {}),
        delivery_tag=int(method.delivery_tag or 0),
    )


# --- reconnecting ----------------------------------------------------------------


class Backoff:
    """Bounded exponential waits with jitter: `initial` doubling up to `maximum` seconds.

    Each wait is the current step times a random factor in [0.5, 1.5), so
    that processes failing together do not retry together.
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self._step = initial

    def next(self) -> float:
        """The next wait, in seconds; the step after it doubles, up to `maximum`."""
        wait = self._step * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not a secret
        self._step = min(self._step * 2, self.maximum)
        return wait

    def reset(self) -> None:
        """Start again from `initial`."""
        self._step = self.initial


def run_with_reconnect(
    loop: Callable[[], None],
    stop: threading.Event,
    *,
    initial: float = 0.5,
    maximum: float = 15.0,
    log: Any = None,
) -> None:
    """Call ``loop`` until it returns or ``stop`` is set, retrying on `BrokerUnavailable`.

    Waits between attempts back off exponentially from ``initial`` to
    ``maximum`` seconds with jitter, and start again from ``initial`` after
    a run that lasted longer than ``maximum``. Other errors propagate.
    """
    logger = log if log is not None else _log
    delay = initial
    while not stop.is_set():
        started = time.monotonic()
        try:
            loop()
        except BrokerUnavailable as e:
            if time.monotonic() - started > maximum:
                delay = initial
            wait = delay * random.uniform(0.5, 1.5)  # noqa: S311 - jitter, not a secret
            logger.warning(
                "broker unavailable; retrying", wait_seconds=round(wait, 2), error=str(e)
            )
            stop.wait(wait)
            delay = min(delay * 2, maximum)
            continue
        return
