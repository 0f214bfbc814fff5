"""``trm console``: serve the participant console, and manage its accounts, tokens and trail.

``trm console run`` serves one home's console with uvicorn, on 127.0.0.1
unless told otherwise; the other subcommands write to or read the home's
database only, so they work while the console runs.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import click
from sqlalchemy.engine import Engine

from broker.errors import ConfigError
from trm import logs
from trm.commands.adapter import _home, _home_options, _reasons
from trm.commands.metrics import metrics_options


@click.group()
def console() -> None:
    """The participant console: a local web application and API over a home."""


@contextmanager
def _database(
    home: Path, database_url: str | None, amqp_url: str | None, vhost: str | None, case_dir: Any
) -> Iterator[Engine]:
    """The home's database for one command, closed when it ends."""
    engine = _home(home, database_url, amqp_url, vhost, case_dir).open_database()
    try:
        yield engine
    finally:
        engine.dispose()


@console.command("run")
@_home_options
@click.option(
    "--host",
    default="127.0.0.1",
    show_default=True,
    envvar="TRM_CONSOLE_HOST",
    help="Address to listen on; keep it on this machine or the staff network [TRM_CONSOLE_HOST].",
)
@click.option(
    "--port",
    type=click.IntRange(1, 65535),
    default=8470,
    show_default=True,
    envvar="TRM_CONSOLE_PORT",
    help="Port to listen on [TRM_CONSOLE_PORT].",
)
@click.option(
    "--allowed-host",
    "allowed_hosts",
    multiple=True,
    help="Another name the console is reached by (a TLS proxy's), host or host:port; "
    "repeatable. Other Host headers are refused.",
)
@click.option(
    "--secure-cookie",
    is_flag=True,
    envvar="TRM_CONSOLE_SECURE_COOKIE",
    help="Mark the session cookie Secure: the console is reached over TLS through a proxy "
    "[TRM_CONSOLE_SECURE_COOKIE]. Implied by --tls-cert.",
)
@click.option(
    "--tls-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Serve HTTPS with this certificate chain (PEM); needs --tls-key.",
)
@click.option(
    "--tls-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The private key of --tls-cert (PEM).",
)
@click.option(
    "--log-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Append JSON log lines here instead of stderr.",
)
@metrics_options
@_reasons
def run(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    host: str,
    port: int,
    allowed_hosts: tuple[str, ...],
    secure_cookie: bool,
    tls_cert: Path | None,
    tls_key: Path | None,
    log_file: Path | None,
    metrics_port: int | None,
    metrics_host: str,
) -> None:
    """Serve the console until SIGTERM or SIGINT."""
    import structlog
    import uvicorn

    from console.accounts import SessionPolicy
    from console.app import create_app, served_as

    if (tls_cert is None) != (tls_key is None):
        raise ConfigError("give --tls-cert and --tls-key together")
    handle = logs.open_log_file(log_file)
    logs.configure(handle)
    try:
        participant = _home(home, database_url, amqp_url, vhost, case_dir)
        app = create_app(
            participant,
            allowed_hosts=served_as(host, port, allowed_hosts),
            policy=SessionPolicy(secure_cookie=secure_cookie or tls_cert is not None),
        )
        if metrics_port is not None:
            from broker.metrics import serve
            from console.metrics import ConsoleCollector

            serve(metrics_port, metrics_host, ConsoleCollector(app.state.console.engine))
        config = uvicorn.Config(
            app,
            host=host,
            port=port,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=5,
            ssl_certfile=None if tls_cert is None else str(tls_cert),
            ssl_keyfile=None if tls_key is None else str(tls_key),
        )
        scheme = "https" if tls_cert is not None else "http"
        structlog.get_logger(__name__).info(
            "console.serving",
            participant=participant.participant_id,
            url=f"{scheme}://{host}:{port}/",
        )
        uvicorn.Server(config).run()
    finally:
        if handle is not None:
            handle.close()


@console.command("openapi")
@click.option(
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Write the document here instead of standard output.",
)
def openapi(out: Path | None) -> None:
    """Print the OpenAPI 3.1 document of the console's API (docs/openapi.json)."""
    from console.reference import openapi_text

    text = openapi_text()
    if out is None:
        click.echo(text, nl=False)
        return
    out.write_text(text, encoding="utf-8")


# --- users -----------------------------------------------------------------------------


@console.group()
def user() -> None:
    """Local accounts of the participant's staff."""


def _read_password(password_file: Path | None) -> str:
    if password_file is not None:
        try:
            return password_file.read_text(encoding="utf-8").rstrip("\n")
        except OSError as e:
            raise ConfigError(f"cannot read --password-file {password_file}: {e.strerror}") from e
    password: str = click.prompt("Password", hide_input=True, confirmation_prompt=True)
    return password


@user.command("add")
@click.argument("username")
@_home_options
@click.option(
    "--role",
    required=True,
    type=click.Choice(["case_worker", "supervisor", "read_only"]),
    help="What the account may do.",
)
@click.option(
    "--language",
    type=click.Choice(["en", "ru"]),
    default="en",
    show_default=True,
    help="The language of its pages.",
)
@click.option(
    "--password-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="Read the password from this file (for scripts); else it is asked for.",
)
@_reasons
def user_add(
    username: str,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    role: str,
    language: str,
    password_file: Path | None,
) -> None:
    """Create account USERNAME; the password is asked for, never taken from the command line."""
    from console import trail
    from console.accounts import add_user

    password = _read_password(password_file)
    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        created = add_user(engine, username, password, role, language)
        trail.record(engine, trail.CLI_ACTOR, trail.Action.USER_ADD)
    click.echo(f"added {created.username} ({created.role}, {created.language})")


@user.command("list")
@_home_options
@click.option("--json", "as_json", is_flag=True, help="Print the accounts as JSON.")
@_reasons
def user_list(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    as_json: bool,
) -> None:
    """Every account: username, role, language, created, disabled."""
    from console.accounts import list_users

    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        users = list_users(engine)
    rows = [
        {
            "username": u.username,
            "role": str(u.role),
            "language": str(u.language),
            "created_at": u.created_at.isoformat(),
            "disabled_at": None if u.disabled_at is None else u.disabled_at.isoformat(),
        }
        for u in users
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no accounts: add one with `trm console user add`")
    for r in rows:
        disabled = f"  DISABLED {r['disabled_at']}" if r["disabled_at"] else ""
        click.echo(
            f"{r['username']:<24} {r['role']:<12} {r['language']}  {r['created_at']}{disabled}"
        )


@user.command("disable")
@click.argument("username")
@_home_options
@_reasons
def user_disable(
    username: str,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
) -> None:
    """Disable account USERNAME and end its sessions at once."""
    from console import trail
    from console.accounts import disable_user

    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        disable_user(engine, username)
        trail.record(engine, trail.CLI_ACTOR, trail.Action.USER_DISABLE)
    click.echo(f"disabled {username}")


# --- tokens ----------------------------------------------------------------------------


@console.group()
def token() -> None:
    """API tokens of the participant's case systems."""


@token.command("add")
@click.argument("name")
@_home_options
@click.option(
    "--scope",
    "scopes",
    multiple=True,
    required=True,
    type=click.Choice(["read", "send", "receipts", "consent", "quarantine", "events"]),
    help="What the token may do; repeatable.",
)
@_reasons
def token_add(
    name: str,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    scopes: tuple[str, ...],
) -> None:
    """Make token NAME and print it once: only its hash is kept."""
    from console import trail
    from console.tokens import add_token

    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        secret = add_token(engine, name, scopes)
        trail.record(engine, trail.CLI_ACTOR, trail.Action.TOKEN_ADD)
    click.echo(secret)
    click.echo(f"token {name} ({' '.join(sorted(set(scopes)))}): shown once, keep it", err=True)


@token.command("list")
@_home_options
@click.option("--json", "as_json", is_flag=True, help="Print the tokens as JSON.")
@_reasons
def token_list(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    as_json: bool,
) -> None:
    """Every token: name, scopes, created, revoked; never the token."""
    from console.tokens import list_tokens

    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        tokens = list_tokens(engine)
    rows: list[dict[str, Any]] = [
        {
            "name": t.name,
            "scopes": sorted(t.scopes),
            "created_at": t.created_at.isoformat(),
            "revoked_at": None if t.revoked_at is None else t.revoked_at.isoformat(),
        }
        for t in tokens
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no tokens: add one with `trm console token add`")
    for r in rows:
        revoked = f"  REVOKED {r['revoked_at']}" if r["revoked_at"] else ""
        click.echo(f"{r['name']:<24} {' '.join(r['scopes']):<40} {r['created_at']}{revoked}")


@token.command("revoke")
@click.argument("name")
@_home_options
@_reasons
def token_revoke(
    name: str,
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
) -> None:
    """Revoke token NAME: refused from the next request on."""
    from console import trail
    from console.tokens import revoke_token

    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        revoke_token(engine, name)
        trail.record(engine, trail.CLI_ACTOR, trail.Action.TOKEN_REVOKE)
    click.echo(f"revoked {name}")


# --- the trail -------------------------------------------------------------------------


@console.command("trail")
@_home_options
@click.option(
    "--limit", type=click.IntRange(1, 10_000), default=50, show_default=True, help="Entries."
)
@click.option("--case", "case", default=None, help="Only the entries of this case.")
@click.option("--json", "as_json", is_flag=True, help="Print the entries as JSON.")
@_reasons
def trail_command(
    home: Path,
    database_url: str | None,
    amqp_url: str | None,
    vhost: str | None,
    case_dir: Path | None,
    limit: int,
    case: str | None,
    as_json: bool,
) -> None:
    """Who did what through the console, newest first: never what a payload said."""
    from console import trail

    with _database(home, database_url, amqp_url, vhost, case_dir) as engine:
        found = trail.entries(engine, limit=limit, case=case)
    rows = [
        {
            "id": e.id,
            "at": e.at.isoformat(),
            "actor": e.actor,
            "action": e.action,
            "envelope_id": e.envelope_id,
            "case": e.case,
        }
        for e in found
    ]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for r in rows:
        click.echo(
            f"{r['at']}  {r['actor']:<28} {r['action']:<18} "
            f"{r['envelope_id'] or '-':<36}  {r['case'] or '-'}"
        )
    if not rows:
        click.echo("the trail is empty")
