"""`trm audit` on the command line: export, verify, replay and proofs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from test_auditlog import CASE, ROUTING, World, append_all, make_world

from broker.database import open_database
from broker.envelope import read_header
from services.merkle import verify_consistency, verify_inclusion
from trm.cli import cli


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Keys, directory and the routing service's home for this module."""
    return make_world(tmp_path_factory.mktemp("cli-world"))


@pytest.fixture
def routing_db(world: World, tmp_path: Path) -> str:
    """A routing database holding one case's story, two entries still unsigned."""
    url = f"sqlite:///{tmp_path / 'routing.db'}"
    engine = open_database(url)
    try:
        log = world.log(engine)
        story = world.seal_story()
        append_all(log, [(raw, at, "ok") for raw, at in story[:3]])
        log.checkpoint(story[2][1])
        append_all(log, [(raw, at, "ok") for raw, at in story[3:]])
    finally:
        engine.dispose()
    return url


def run(*args: str) -> tuple[int, str]:
    """Exit code and stdout of `trm ARGS`; a failure's reason is on stdout or stderr."""
    result = CliRunner().invoke(cli, list(args))
    return result.exit_code, result.stdout if result.exit_code == 0 else result.output


def export(world: World, url: str, out: Path) -> None:
    code, output = run(
        "audit",
        "export",
        "--home",
        str(world.root / ROUTING),
        "--out",
        str(out),
        "--database-url",
        url,
    )
    assert code == 0, output
    assert f"{out}: 5 entries, 2 checkpoints" in output


def verify_args(world: World, path: Path) -> list[str]:
    return [
        "audit",
        "verify",
        str(path),
        "--directory",
        str(world.root / "directory.json"),
        "--authority-key",
        str(world.root / "authority" / "authority.pub"),
        "--workers",
        "1",
    ]


def test_export_then_verify_exits_zero(world: World, routing_db: str, tmp_path: Path) -> None:
    """An export of the routing database verifies with exit 0 and a one-line summary."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    code, output = run(*verify_args(world, out))
    assert code == 0, output
    assert output.startswith("intact: 5 entries, 2 checkpoints, 5 envelopes verified")
    code, output = run(*verify_args(world, out), "--json")
    assert code == 0 and json.loads(output)["intact"] is True


def test_verify_tampered_file_exits_one_naming_the_entry(
    world: World, routing_db: str, tmp_path: Path
) -> None:
    """A deleted entry makes verify exit 1 and print which entry is missing."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    lines = out.read_text().splitlines(keepends=True)
    entry_two = next(i for i, ln in enumerate(lines) if '"index":2,' in ln)
    del lines[entry_two]
    out.write_text("".join(lines))
    code, output = run(*verify_args(world, out))
    assert code == 1
    assert output.startswith("entry 2: missing")
    code, output = run(*verify_args(world, out), "--json")
    assert code == 1 and json.loads(output)["index"] == 2


def test_verify_against_a_kept_checkpoint(world: World, routing_db: str, tmp_path: Path) -> None:
    """--checkpoint accepts a note the export extends."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    first_note = json.loads(out.read_text().splitlines()[4])["note"]
    kept = tmp_path / "kept.note"
    kept.write_text(first_note)
    code, output = run(*verify_args(world, out), "--checkpoint", str(kept))
    assert code == 0, output


def test_verify_with_a_wrong_authority_key_fails_clearly(
    world: World, routing_db: str, tmp_path: Path
) -> None:
    """A directory that does not verify with the given authority key ends with a reason."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    args = verify_args(world, out)
    args[args.index("--authority-key") + 1] = str(world.root / ROUTING / "participant.json")
    code, output = run(*args)
    assert code == 1 and "key_file" in output


def test_replay_prints_the_case(world: World, routing_db: str, tmp_path: Path) -> None:
    """replay prints the case's stage and each handoff in order."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    code, output = run("audit", "replay", str(out))
    assert code == 0, output
    assert output.splitlines()[0] == f"case {CASE}: received"
    kinds = [
        line.split()[2] if "(+" in line else line.split()[1] for line in output.splitlines()[1:]
    ]
    assert kinds == [
        "return_request",
        "return_accepted",
        "travel_arranged",
        "departed",
        "reception_confirmed",
    ]
    code, output = run("audit", "replay", str(out), "--case", CASE, "--json")
    assert code == 0 and json.loads(output)[CASE]["stage"] == "received"
    code, output = run("audit", "replay", str(out), "--case", "KZ-0000-none")
    assert code == 1 and "does not appear" in output


def test_proofs_from_the_command_line(world: World, routing_db: str) -> None:
    """proof and consistency print JSON proofs that verify against the signed root."""
    engine = open_database(routing_db)
    with engine.connect() as conn:
        body = conn.execute(sa.text("SELECT body FROM log_entries WHERE idx = 3")).scalar_one()
    engine.dispose()
    envelope_id = str(read_header(bytes(body)).id)
    home = str(world.root / ROUTING)
    code, output = run(
        "audit", "proof", "--home", home, "--envelope", envelope_id, "--database-url", routing_db
    )
    assert code == 0, output
    data = json.loads(output)
    assert (data["index"], data["size"]) == (3, 5)
    verify_inclusion(
        bytes.fromhex(data["leaf_hash"]),
        3,
        5,
        [bytes.fromhex(h) for h in data["proof"]],
        bytes.fromhex(data["root"]),
    )
    assert "\n5\n" in data["checkpoint"]
    code, output = run(
        "audit", "consistency", "--home", home, "--old", "3", "--database-url", routing_db
    )
    assert code == 0, output
    c = json.loads(output)
    verify_consistency(
        3,
        5,
        bytes.fromhex(c["old_root"]),
        bytes.fromhex(c["new_root"]),
        [bytes.fromhex(h) for h in c["proof"]],
    )
    code, output = run(
        "audit", "proof", "--home", home, "--envelope", "nope", "--database-url", routing_db
    )
    assert code == 1 and "not in the audit log" in output
