"""A small client for the RabbitMQ management HTTP API.

Users, vhosts and permissions are managed over HTTP rather than with
``rabbitmqctl``: the API works remotely and into containers, needs no Erlang
cookie, answers in milliseconds, and its PUTs are idempotent (see
docs/operations.md, "Provisioning"). Errors become `ProvisioningError`,
`LoginRefused` (wrong password) or `AccessRefused` (missing tag) naming the
request path and status, never the password.

A broker that is restarting refuses connections for a few seconds, so a call
that meets a refused or reset connection (or a 503) is tried again with
backoff (`RETRY_DELAYS`, about 16 s in all) before it fails. Every call the
client makes is idempotent, so trying one again is safe.
"""

from __future__ import annotations

import base64
import fcntl
import hashlib
import hmac
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.error import HTTPError, URLError
from urllib.parse import quote, unquote, urlsplit
from urllib.request import Request, urlopen

from broker.errors import AccessRefused, ConfigError, LoginRefused, ProvisioningError

DEFAULT_MANAGEMENT_URL = "http://guest:guest@127.0.0.1:15672/"
MANAGEMENT_URL_ENV = "TRM_AMQP_MANAGEMENT_URL"
RETRY_DELAYS: tuple[float, ...] = (0.25, 0.5, 1, 2, 4, 4, 4)
"""Seconds between tries of a call the broker refused: a restart takes 5 to 10 s."""
_TRANSIENT_STATUS = 503  # the management listener is up but the node is still booting
_HASHES = {
    "rabbit_password_hashing_sha256": hashlib.sha256,
    "rabbit_password_hashing_sha512": hashlib.sha512,
    "rabbit_password_hashing_md5": hashlib.md5,
}


@dataclass(frozen=True)
class QueueInfo:
    """One queue as the management API reports it (counts lag by a few seconds)."""

    name: str
    type: str
    messages: int
    messages_ready: int
    messages_unacknowledged: int
    consumers: int
    arguments: dict[str, Any]


def _segment(name: str) -> str:
    """One URL path segment: vhost "/" becomes %2F, as the API wants."""
    return quote(name, safe="")


class ManagementClient:
    """Calls the management API as the user named in its URL."""

    def __init__(
        self,
        url: str | None = None,
        *,
        timeout: float = 10,
        retry_delays: Sequence[float] = RETRY_DELAYS,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        chosen = url or os.environ.get(MANAGEMENT_URL_ENV) or DEFAULT_MANAGEMENT_URL
        parts = urlsplit(chosen)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(
                f"{MANAGEMENT_URL_ENV} / --management-url must look like "
                f"http://user:password@host:15672/, got scheme {parts.scheme!r}"
            )
        self.username = unquote(parts.username or "")
        password = unquote(parts.password or "")
        if not self.username:
            raise ConfigError(f"{MANAGEMENT_URL_ENV} names no user: use http://user:pass@host/")
        port = f":{parts.port}" if parts.port else ""
        self.base = f"{parts.scheme}://{parts.hostname}{port}{parts.path.rstrip('/')}/api"
        token = base64.b64encode(f"{self.username}:{password}".encode()).decode("ascii")
        self._authorization = f"Basic {token}"
        self._timeout = timeout
        self._retry_delays = tuple(retry_delays)
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"ManagementClient({self.base!r}, user={self.username!r})"

    @contextmanager
    def users_held(self) -> Iterator[None]:
        """Hold this machine's lock on the broker's users for the block.

        Users are broker-wide and shared by every vhost that grants them. A
        provisioning that finds a user and grants it a vhost must not interleave
        with a removal that finds the same user unused and deletes it, or the
        grant meets no user (or the user vanishes just after). Both take this
        lock: an exclusive ``flock`` on a file named for the broker, so it holds
        across processes on one machine, test workers and campaigns included.
        The file is private to the system user (another user's could not be
        opened), so it orders that user's processes only.
        """
        name = hashlib.sha256(self.base.encode()).hexdigest()[:16]
        path = Path(tempfile.gettempdir()) / f"trm-broker-users-{os.getuid()}-{name}.lock"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the lock

    # --- the one HTTP call ---------------------------------------------------

    def request(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """One API call; the parsed JSON answer, or None (or 404 with ``missing_ok``).

        Tried again after each of ``retry_delays`` while the broker refuses or
        drops the connection (or answers 503), then `ProvisioningError`.
        """
        data = None if body is None else json.dumps(body).encode()
        request = Request(  # noqa: S310 - the scheme is checked to be http(s) in __init__
            self.base + path, data=data, method=method
        )
        request.add_header("Authorization", self._authorization)
        request.add_header("Content-Type", "application/json")
        delays = iter(self._retry_delays)
        while True:
            try:
                raw = self._send(request)
            except HTTPError as e:
                if e.code == 404 and missing_ok:
                    return None
                delay = next(delays, None) if e.code == _TRANSIENT_STATUS else None
                if delay is None:
                    raise self._error(method, path, e) from e
            except (URLError, OSError) as e:
                delay = next(delays, None) if _transient(e) else None
                if delay is None:
                    raise self._unanswered(method, path, e) from e
            else:
                return json.loads(raw) if raw else None
            self._sleep(delay)

    def _send(self, request: Request) -> bytes:
        with urlopen(request, timeout=self._timeout) as response:  # noqa: S310
            raw: bytes = response.read()
        return raw

    def _unanswered(self, method: str, path: str, e: OSError) -> ProvisioningError:
        cause = e.reason if isinstance(e, URLError) else e
        tries = ""
        if _transient(e) and self._retry_delays:
            waited = sum(self._retry_delays)
            tries = f", {len(self._retry_delays) + 1} tries over {waited:g} s"
        return ProvisioningError(
            f"the RabbitMQ management API at {self.base} does not answer ({method} "
            f"{path}: {type(cause).__name__}{tries}); check that RabbitMQ runs with the "
            f"rabbitmq_management plugin enabled and {MANAGEMENT_URL_ENV} points at it"
        )

    def _error(self, method: str, path: str, e: HTTPError) -> ProvisioningError | AccessRefused:
        try:
            reason = str(json.loads(e.read()).get("reason", ""))
        except (ValueError, OSError, AttributeError):
            reason = ""
        what = f"{method} {path} answered {e.code} {reason}".rstrip()
        if e.code == 401 and reason.lower().startswith("not "):
            # "Not management user", "Not administrator user": the login was right.
            return AccessRefused(
                f"the RabbitMQ management API refused user {self.username!r}: {what}; give it "
                f"the administrator tag (rabbitmqctl set_user_tags {self.username} "
                "administrator) or use an administrator in "
                f"{MANAGEMENT_URL_ENV} / --management-url"
            )
        if e.code == 401:
            return LoginRefused(
                f"the RabbitMQ management API refused the login of user {self.username!r}: "
                f"{what}; the password in {MANAGEMENT_URL_ENV} / --management-url is wrong "
                "or there is no such user"
            )
        if e.code == 403:
            return AccessRefused(
                f"the RabbitMQ management API refused user {self.username!r}: {what}; it "
                "needs the administrator tag"
            )
        return ProvisioningError(f"the RabbitMQ management API failed: {what}")

    # --- vhosts, users, permissions -------------------------------------------

    def create_vhost(self, vhost: str) -> None:
        """Create ``vhost`` (no change when it exists)."""
        self.request("PUT", f"/vhosts/{_segment(vhost)}", {})

    def delete_vhost(self, vhost: str) -> None:
        """Delete ``vhost`` with everything in it (no error when it is gone)."""
        self.request("DELETE", f"/vhosts/{_segment(vhost)}", missing_ok=True)

    def vhost_exists(self, vhost: str) -> bool:
        """Whether ``vhost`` exists."""
        return self.request("GET", f"/vhosts/{_segment(vhost)}", missing_ok=True) is not None

    def get_user(self, name: str) -> dict[str, Any] | None:
        """The user's record, or None when there is no such user."""
        found = self.request("GET", f"/users/{_segment(name)}", missing_ok=True)
        return dict(found) if found is not None else None

    def put_user(self, name: str, password: str, *, tags: str = "") -> None:
        """Create the user or set its password and tags (no tags: no management access)."""
        self.request("PUT", f"/users/{_segment(name)}", {"password": password, "tags": tags})

    def delete_user(self, name: str) -> None:
        """Delete the user (no error when it is gone)."""
        self.request("DELETE", f"/users/{_segment(name)}", missing_ok=True)

    def delete_user_if_unused(self, name: str) -> bool:
        """Delete the user if no vhost grants it permissions; whether it was deleted.

        Checked and deleted under `users_held`, so a provisioning of another
        vhost that keeps this user cannot slip in between.
        """
        with self.users_held():
            if self.get_user(name) is None or self.user_vhosts(name):
                return False
            self.delete_user(name)
            return True

    def set_permissions(
        self, vhost: str, user: str, *, configure: str, write: str, read: str
    ) -> None:
        """Set the user's configure/write/read regular expressions on ``vhost``."""
        self.request(
            "PUT",
            f"/permissions/{_segment(vhost)}/{_segment(user)}",
            {"configure": configure, "write": write, "read": read},
        )

    def get_permissions(self, vhost: str, user: str) -> dict[str, str] | None:
        """The user's permissions on ``vhost``, or None when it has none."""
        found = self.request(
            "GET", f"/permissions/{_segment(vhost)}/{_segment(user)}", missing_ok=True
        )
        if found is None:
            return None
        return {key: str(found[key]) for key in ("configure", "write", "read")}

    # --- queues ---------------------------------------------------------------

    def list_queues(self, vhost: str) -> list[QueueInfo]:
        """Every queue on ``vhost`` with its message counts, sorted by name."""
        found = self.request("GET", f"/queues/{_segment(vhost)}", missing_ok=True)
        if found is None:
            raise ProvisioningError(
                f"there is no vhost {vhost!r} on the broker at {self.base}: check --vhost / "
                "TRM_AMQP_VHOST, or run trm broker provision to create it"
            )
        queues = [
            QueueInfo(
                name=str(q["name"]),
                type=str(q.get("type", "classic")),
                messages=int(q.get("messages", 0) or 0),
                messages_ready=int(q.get("messages_ready", 0) or 0),
                messages_unacknowledged=int(q.get("messages_unacknowledged", 0) or 0),
                consumers=int(q.get("consumers", 0) or 0),
                arguments=dict(q.get("arguments", {})),
            )
            for q in found
        ]
        return sorted(queues, key=lambda q: q.name)

    def get_queue(self, vhost: str, name: str) -> dict[str, Any] | None:
        """The queue's full record, or None when there is no such queue."""
        found = self.request("GET", f"/queues/{_segment(vhost)}/{_segment(name)}", missing_ok=True)
        return dict(found) if found is not None else None

    def queue_depth(self, vhost: str, name: str) -> int:
        """Messages in the queue (ready + unacknowledged), as last sampled by the broker."""
        found = self.get_queue(vhost, name)
        if found is None:
            raise ProvisioningError(
                f"no queue {name!r} on vhost {vhost!r}: run trm broker provision"
            )
        return int(found.get("messages", 0) or 0)

    def peek_messages(self, vhost: str, name: str, count: int) -> list[bytes]:
        """Up to `count` message bodies from the head of the queue, requeued (for inspection)."""
        if count <= 0:
            return []
        body = {"count": count, "ackmode": "ack_requeue_true", "encoding": "base64"}
        found = self.request("POST", f"/queues/{_segment(vhost)}/{_segment(name)}/get", body)
        return [base64.b64decode(m["payload"]) for m in found or []]

    def delete_queue(self, vhost: str, name: str) -> None:
        """Delete the queue with its messages (no error when it is gone)."""
        self.request("DELETE", f"/queues/{_segment(vhost)}/{_segment(name)}", missing_ok=True)

    def vhost_users(self, vhost: str) -> list[str]:
        """The users holding permissions on ``vhost``."""
        found = self.request("GET", f"/vhosts/{_segment(vhost)}/permissions", missing_ok=True)
        return sorted(str(p["user"]) for p in found or [])

    def user_vhosts(self, user: str) -> list[str]:
        """The vhosts on which ``user`` holds permissions."""
        found = self.request("GET", f"/users/{_segment(user)}/permissions", missing_ok=True)
        return sorted(str(p["vhost"]) for p in found or [])


def password_matches(user: dict[str, Any], password: str) -> bool:
    """Whether ``password`` is the one behind a user record's ``password_hash``.

    RabbitMQ stores base64(salt + H(salt + password)) with a 4-byte salt; a
    hash it does not name, or a user without a password, never matches.
    """
    digest = _HASHES.get(str(user.get("hashing_algorithm", "")))
    try:
        stored = base64.b64decode(str(user.get("password_hash") or ""), validate=True)
    except ValueError:
        return False
    if digest is None or len(stored) <= 4:
        return False
    salt = stored[:4]
    return hmac.compare_digest(stored[4:], digest(salt + password.encode()).digest())


def _transient(error: OSError) -> bool:
    """A refused or dropped connection: what a broker that is restarting gives."""
    cause = error.reason if isinstance(error, URLError) else error
    return isinstance(cause, ConnectionRefusedError | ConnectionResetError)
