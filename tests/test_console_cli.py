"""`trm console user`, `token` and `trail` on a home's database: passwords never on the
command line nor stored in the clear, a token shown once and kept hashed, revocation and
disabling immediate, each change in the trail, refusals with a reason and nothing changed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner

from broker.database import open_database
from console.accounts import SessionPolicy, session_of, sign_in
from console.tokens import authenticate
from tests.console_support import PASSWORD, counts
from trm.cli import cli


@pytest.fixture
def home(tmp_path: Path) -> Path:
    """An empty home folder: the console commands need only its database."""
    folder = tmp_path / "home"
    folder.mkdir()
    return folder


def trm(*args: str, input: str | None = None) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), input=input)
    return result.exit_code, result.stdout, result.stderr


def engine_of(home: Path) -> sa.Engine:
    return open_database(f"sqlite:///{home / 'trm.db'}")


def add_user(home: Path, name: str, *extra: str) -> tuple[int, str, str]:
    secret = home.parent / f"{name}.password"
    secret.write_text(PASSWORD + "\n")
    return trm(
        "console", "user", "add", name, "--home", str(home), "--role", "case_worker",
        "--password-file", str(secret), *extra,
    )  # fmt: skip


def test_user_add_keeps_an_argon2_hash_and_lists_the_account(home):
    """The account is listed with its role and language; the database holds an argon2id
    hash, never the password."""
    code, out, _ = add_user(home, "amina", "--language", "ru")
    assert code == 0, out
    code, out, _ = trm("console", "user", "list", "--home", str(home), "--json")
    [listed] = json.loads(out)
    assert (listed["username"], listed["role"], listed["language"]) == (
        "amina",
        "case_worker",
        "ru",
    )
    engine = engine_of(home)
    try:
        with engine.connect() as conn:
            stored = conn.execute(sa.text("SELECT password_hash FROM console_users")).scalar_one()
    finally:
        engine.dispose()
    assert stored.startswith("$argon2id$")
    assert PASSWORD not in stored


def test_the_password_can_be_typed_at_a_prompt_and_never_given_as_an_option(home):
    """The password is asked for twice (hidden); a --password option does not exist."""
    code, out, _ = trm(
        "console", "user", "add", "oleg", "--home", str(home), "--role", "read_only",
        input=f"{PASSWORD}\n{PASSWORD}\n",
    )  # fmt: skip
    assert code == 0, out
    assert PASSWORD not in out
    code, _, err = trm(
        "console", "user", "add", "ivan", "--home", str(home), "--role", "read_only",
        "--password", PASSWORD,
    )  # fmt: skip
    assert code == 2
    assert "No such option" in err


def test_a_taken_name_or_a_short_password_is_refused_with_nothing_changed(home):
    """A second `amina` and a 5-character password are refused with a reason; no row added."""
    add_user(home, "amina")
    engine = engine_of(home)
    try:
        before = counts(engine)
        code, _, err = add_user(home, "amina")
        assert code == 1
        assert "exists already" in err
        short = home.parent / "short"
        short.write_text("abcde")
        code, _, err = trm(
            "console", "user", "add", "zed", "--home", str(home), "--role", "read_only",
            "--password-file", str(short),
        )  # fmt: skip
        assert code == 1
        assert "at least 12 characters" in err
        assert counts(engine) == before
    finally:
        engine.dispose()


def test_disabling_a_user_ends_its_sessions_at_once(home):
    """A signed-in account disabled from the command line has no live session left."""
    add_user(home, "amina")
    engine = engine_of(home)
    try:
        session = sign_in(engine, "amina", PASSWORD, "127.0.0.1", SessionPolicy())
        assert session_of(engine, session.token, SessionPolicy()) is not None
        code, out, _ = trm("console", "user", "disable", "amina", "--home", str(home))
        assert code == 0, out
        assert session_of(engine, session.token, SessionPolicy()) is None
    finally:
        engine.dispose()


def test_a_token_is_shown_once_kept_hashed_and_revoked_at_once(home):
    """`token add` prints the token; `token list` and the database never show it; after
    `token revoke` it authenticates no more; revoking an unknown name is refused."""
    code, out, _ = trm(
        "console", "token", "add", "case-system", "--home", str(home),
        "--scope", "read", "--scope", "send",
    )  # fmt: skip
    assert code == 0, out
    token = out.strip()
    assert token.startswith("trm_")
    code, listing, _ = trm("console", "token", "list", "--home", str(home), "--json")
    assert token not in listing
    assert json.loads(listing)[0]["scopes"] == ["read", "send"]
    engine = engine_of(home)
    try:
        with engine.connect() as conn:
            assert token not in repr(conn.execute(sa.text("SELECT * FROM console_tokens")).all())
        assert authenticate(engine, token) is not None
        assert trm("console", "token", "revoke", "case-system", "--home", str(home))[0] == 0
        assert authenticate(engine, token) is None
    finally:
        engine.dispose()
    code, _, err = trm("console", "token", "revoke", "nobody", "--home", str(home))
    assert code == 1
    assert "no API token 'nobody'" in err


def test_the_trail_lists_what_the_command_line_did(home):
    """Each account and token change is in `trm console trail`, newest first."""
    add_user(home, "amina")
    trm("console", "token", "add", "cms", "--home", str(home), "--scope", "read")
    trm("console", "token", "revoke", "cms", "--home", str(home))
    code, out, _ = trm("console", "trail", "--home", str(home), "--json")
    assert code == 0
    assert [(e["actor"], e["action"]) for e in json.loads(out)] == [
        ("cli:", "token_revoke"),
        ("cli:", "token_add"),
        ("cli:", "user_add"),
    ]
