"""`trm audit` on the command line: export, verify, replay and proofs."""

from __future__ import annotations

import base64
import json
import shutil
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from click.testing import CliRunner
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_auditlog import CASE, NGO, ROUTING, T0, World, append_all, make_world

from broker.database import open_database
from broker.directory import Role, sign_directory
from broker.envelope import read_header
from services.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from services.merkle import MerkleTree, verify_consistency, verify_inclusion
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


def authority_key(world: World) -> list[str]:
    return ["--authority-key", str(world.root / "authority" / "authority.pub")]


def test_replay_prints_the_case(world: World, routing_db: str, tmp_path: Path) -> None:
    """replay prints the case's stage and each handoff in order."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    code, output = run("audit", "replay", str(out), *authority_key(world))
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
    code, output = run("audit", "replay", str(out), *authority_key(world), "--case", CASE, "--json")
    assert code == 0 and json.loads(output)[CASE]["stage"] == "received"
    code, output = run(
        "audit", "replay", str(out), *authority_key(world), "--case", "iom-kz.KZ-0000-none"
    )
    assert code == 1 and "does not appear" in output


def test_replay_refuses_a_directory_not_signed_by_the_authority(
    world: World, routing_db: str, tmp_path: Path
) -> None:
    """replay exits 1 on an export embedding a re-roled directory signed by a throwaway key."""
    out = tmp_path / "audit.jsonl"
    export(world, routing_db, out)
    lines = out.read_text().splitlines(keepends=True)
    cards = tuple(
        c.model_copy(update={"role": Role.MISSION, "parent": None}) if c.id == NGO else c
        for c in world.body.participants
    )
    reroled = world.body.model_copy(update={"participants": cards})
    forged = sign_directory(reroled, Ed25519PrivateKey.generate())
    header = {**json.loads(lines[0]), "directory": base64.b64encode(forged).decode()}
    out.write_text(json.dumps(header) + "\n" + "".join(lines[1:]))
    code, output = run("audit", "replay", str(out), *authority_key(world))
    assert code == 1 and "does not verify with the authority key" in output
    directory = str(world.root / "directory.json")
    code, output = run("audit", "replay", str(out), *authority_key(world), "--directory", directory)
    assert code == 0 and output.startswith(f"case {CASE}: received"), output


def entry_id(url: str, index: int) -> str:
    """The envelope id of entry `index` in the routing database at `url`."""
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            body = conn.execute(
                sa.text("SELECT body FROM log_entries WHERE idx = :i"), {"i": index}
            ).scalar_one()
    finally:
        engine.dispose()
    return str(read_header(bytes(body)).id)


def signed_sizes(url: str) -> list[int]:
    engine = open_database(url)
    try:
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT size FROM log_checkpoints ORDER BY size")).all()
    finally:
        engine.dispose()
    return [int(r.size) for r in rows]


def keyless_home(world: World, tmp_path: Path) -> str:
    """A copy of the routing service's home without its private keys."""
    home = tmp_path / "routing-public"
    ignore = shutil.ignore_patterns("keys")
    shutil.copytree(world.root / ROUTING, home, ignore=ignore, dirs_exist_ok=True)
    assert not (home / "keys").exists()
    return str(home)


def prove(world: World, url: str, tmp_path: Path, *args: str) -> dict[str, Any]:
    """`trm audit ARGS` on a keyless copy of the routing home: the JSON it prints."""
    home = keyless_home(world, tmp_path)
    code, output = run("audit", *args, "--home", home, "--database-url", url)
    assert code == 0, output
    data: dict[str, Any] = json.loads(output)
    return data


def test_proofs_are_read_only(world: World, routing_db: str, tmp_path: Path) -> None:
    """proof and consistency need no private key, sign nothing, and use the newest checkpoint."""
    data = prove(world, routing_db, tmp_path, "proof", "--envelope", entry_id(routing_db, 1))
    assert (data["index"], data["size"]) == (1, 3)
    verify_inclusion(
        bytes.fromhex(data["leaf_hash"]),
        1,
        3,
        [bytes.fromhex(h) for h in data["proof"]],
        bytes.fromhex(data["root"]),
    )
    assert "\n3\n" in data["checkpoint"]
    c = prove(world, routing_db, tmp_path, "consistency", "--old", "1")
    assert (c["old_size"], c["new_size"], c["old_checkpoint"]) == (1, 3, None)
    verify_consistency(
        1,
        3,
        bytes.fromhex(c["old_root"]),
        bytes.fromhex(c["new_root"]),
        [bytes.fromhex(h) for h in c["proof"]],
    )
    assert signed_sizes(routing_db) == [3]
    home = keyless_home(world, tmp_path / "again")
    code, output = run("audit", "proof", "--home", home, "--envelope", entry_id(routing_db, 3),
                       "--database-url", routing_db)  # fmt: skip
    assert code == 1 and "not covered by a signed checkpoint yet" in output
    code, output = run("audit", "proof", "--home", home, "--envelope", "nope",
                       "--database-url", routing_db)  # fmt: skip
    assert code == 1 and "not in the audit log" in output
    assert signed_sizes(routing_db) == [3]


def check_args(world: World, path: Path, *extra: str) -> list[str]:
    return [
        "audit",
        "check-proof",
        str(path),
        "--directory",
        str(world.root / "directory.json"),
        *authority_key(world),
        *extra,
    ]


def write_json(path: Path, data: dict[str, Any]) -> Path:
    path.write_text(json.dumps(data))
    return path


def test_check_proof_accepts_an_inclusion_proof(
    world: World, routing_db: str, tmp_path: Path
) -> None:
    """check-proof, with only the directory and the authority key, accepts a genuine proof."""
    data = prove(world, routing_db, tmp_path, "proof", "--envelope", entry_id(routing_db, 2))
    path = write_json(tmp_path / "proof.json", data)
    code, output = run(*check_args(world, path))
    assert code == 0, output
    assert output.startswith(f"proof holds: entry 2 (envelope {data['envelope_id']}) is in the ")
    assert f"routing participant {ROUTING!r} at 3 entries" in output
    code, output = run(*check_args(world, path, "--log-id", ROUTING, "--json"))
    assert code == 0 and json.loads(output)["index"] == 2


def _flip(text: str) -> str:
    return ("1" if text[0] == "0" else "0") + text[1:]


TAMPERINGS = {
    "a proof hash": (lambda d: d["proof"].__setitem__(0, _flip(d["proof"][0])), "leads to root"),
    "the entry": (
        lambda d: d["entry"].__setitem__("received_at", d["entry"]["received_at"][:-2] + "9Z"),
        "leaf_hash",
    ),
    "the index": (lambda d: d.__setitem__("index", 0), "states index 0"),
    "the size": (lambda d: d.__setitem__("size", 2), "states size 2"),
    "the root": (lambda d: d.__setitem__("root", _flip(d["root"])), "states root"),
    "the note": (
        lambda d: d.__setitem__("checkpoint", d["checkpoint"].replace("\n3\n", "\n2\n", 1)),
        "does not verify",
    ),
}


@pytest.mark.parametrize("what", sorted(TAMPERINGS))
def test_check_proof_refuses_a_tampered_inclusion_proof(
    world: World, routing_db: str, tmp_path: Path, what: str
) -> None:
    """A proof with any part changed after it was written exits 1 saying what does not hold."""
    data = prove(world, routing_db, tmp_path, "proof", "--envelope", entry_id(routing_db, 2))
    edit, message = TAMPERINGS[what]
    edit(data)
    code, output = run(*check_args(world, write_json(tmp_path / "bad.json", data)))
    assert code == 1 and message in output


def ngo_signed(world: World, note: str, origin: str) -> str:
    """The checkpoint of `note` re-signed by the NGO's key under its own name, with `origin`."""
    routing = world.sender(ROUTING)
    name = next(line.split(" ")[1] for line in note.splitlines() if line.startswith("\u2014"))
    cp = open_checkpoint(note.encode(), key=routing.key.public_key(), key_name=name)
    ngo = world.sender(NGO)
    forged = Checkpoint(origin, cp.size, cp.root, cp.time)
    return sign_checkpoint(forged, ngo.key, f"{NGO}/{ngo.kid}").decode()


@pytest.mark.parametrize("origin", [f"trm.routing/{NGO}", f"trm.routing/{ROUTING}"])
def test_check_proof_refuses_a_checkpoint_signed_by_an_ngo(
    world: World, routing_db: str, tmp_path: Path, origin: str
) -> None:
    """A proof whose checkpoint the NGO signed is refused, whichever log its origin names."""
    data = prove(world, routing_db, tmp_path, "proof", "--envelope", entry_id(routing_db, 2))
    data["checkpoint"] = ngo_signed(world, data["checkpoint"], origin)
    code, output = run(*check_args(world, write_json(tmp_path / "ngo.json", data)))
    assert code == 1
    expected = "not a routing participant" if NGO in origin else "no signature by a key of the log"
    assert expected in output


def test_check_proof_of_consistency_needs_a_signed_old_tree(
    world: World, routing_db: str, tmp_path: Path
) -> None:
    """A consistency proof holds against a kept checkpoint; an unsigned old root is refused."""
    old = tmp_path / "old.note"
    old.write_text(prove(world, routing_db, tmp_path / "a", "proof", "--envelope",
                         entry_id(routing_db, 0))["checkpoint"])  # fmt: skip
    tree_of_five(world, routing_db)
    data = prove(world, routing_db, tmp_path / "b", "consistency", "--old", "3")
    assert data["old_checkpoint"] is not None and data["new_size"] == 5
    path = write_json(tmp_path / "consistency.json", data)
    code, output = run(*check_args(world, path, "--checkpoint", str(old)))
    assert code == 0, output
    assert "at 5 entries" in output and "extends the tree of 3 entries" in output
    unsigned = write_json(tmp_path / "unsigned.json", {**data, "old_checkpoint": None})
    code, output = run(*check_args(world, unsigned))
    assert code == 1 and "no signed checkpoint commits to the tree of 3 entries" in output
    code, output = run(*check_args(world, unsigned, "--checkpoint", str(old)))
    assert code == 0, output
    bad = dict(data, proof=[_flip(data["proof"][0]), *data["proof"][1:]])
    code, output = run(*check_args(world, write_json(tmp_path / "bad.json", bad)))
    assert code == 1 and "consistency proof leads to" in output


def test_check_proof_refuses_a_consistency_proof_from_another_tree(
    world: World, routing_db: str, tmp_path: Path
) -> None:
    """A kept checkpoint of a different tree of the same size contradicts the proof."""
    tree_of_five(world, routing_db)
    data = prove(world, routing_db, tmp_path, "consistency", "--old", "3")
    routing = world.sender(ROUTING)
    other = MerkleTree.from_leaves([bytes([7]) * 32] * 3).root()
    fork = sign_checkpoint(
        Checkpoint(f"trm.routing/{ROUTING}", 3, other, T0), routing.key, f"{ROUTING}/{routing.kid}"
    )
    kept = tmp_path / "fork.note"
    kept.write_bytes(fork)
    code, output = run(*check_args(world, write_json(tmp_path / "c.json", data), "--checkpoint",
                                   str(kept)))  # fmt: skip
    assert code == 1 and "differ" in output


def tree_of_five(world: World, url: str) -> None:
    """Sign the checkpoint of all five entries, as the routing service does as the log grows."""
    engine = open_database(url)
    try:
        assert world.log(engine).checkpoint(T0 + timedelta(hours=1)) is not None
    finally:
        engine.dispose()
    assert signed_sizes(url) == [3, 5]
