"""The console's Prometheus metrics, served by ``trm console run --metrics-port``.

Requests are counted by route template (``/api/v1/deliveries/{envelope_id}``),
never by the path a client sent, so no envelope id or case reference becomes
a label; refused sign-ins by reason; open event streams as a gauge.
"""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import Counter, Gauge
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.engine import Engine

from broker.database import storage_errors
from broker.errors import TrmError
from broker.metrics import REGISTRY
from console.guards import ASGIApp, Message, Receive, Scope, Send

REQUESTS = Counter(
    "trm_console_requests",
    "Requests the console answered, by route template and status.",
    ["route", "status"],
    registry=REGISTRY,
)
SIGN_INS_REFUSED = Counter(
    "trm_console_sign_ins_refused",
    "Sign-ins refused: a wrong password (sign_in_refused) or the rate limit (rate_limited).",
    ["reason"],
    registry=REGISTRY,
)
STREAMS = Gauge(
    "trm_console_event_streams",
    "Event streams (server-sent events) open now.",
    registry=REGISTRY,
)
UNMATCHED = "unmatched"
"""The route label of a request no route took (404s, refusals before routing)."""


class RequestMetrics:
    """Counts every HTTP response by the template of the route that answered it."""

    def __init__(self, app: ASGIApp) -> None:
        """Wrap `app`."""
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        """Pass the request on; count its response's status."""
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [0]

        async def counted(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counted)
        finally:
            route = getattr(scope.get("route"), "path", None) or UNMATCHED
            REQUESTS.labels(route=route, status=str(status[0] or 500)).inc()


class ConsoleCollector(Collector):
    """Scrape-time figures from the home's database: accounts and live tokens."""

    def __init__(self, engine: Engine) -> None:
        """Read `engine` at each scrape."""
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily]:
        """The figures, or none if the database cannot be read now."""
        from console.accounts import list_users
        from console.tokens import list_tokens

        try:
            with storage_errors("reading the console's figures"):
                users = list_users(self.engine)
                tokens = list_tokens(self.engine)
        except TrmError:
            return
        accounts = GaugeMetricFamily(
            "trm_console_accounts",
            "Staff accounts that are not disabled, by role.",
            labels=["role"],
        )
        for role in sorted({str(u.role) for u in users}):
            live = sum(1 for u in users if str(u.role) == role and u.disabled_at is None)
            accounts.add_metric([role], live)
        yield accounts
        yield GaugeMetricFamily(
            "trm_console_tokens",
            "API tokens not revoked.",
            value=sum(1 for t in tokens if t.revoked_at is None),
        )
