"""`trm init` and `trm directory ...` end to end with click's test runner.

The world's suites differ (iom-uz's key is X25519 only), so `trm send` over
it shows what a classical recipient costs the others.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from broker.directory import load_home_directory
from broker.keys import pin_authority
from schemas.base import MessageKind
from schemas.examples import EXAMPLE_CASE, example
from schemas.registry import encode_payload
from trm.cli import cli

PARTICIPANTS = (
    ("iom-kz", "mission", "KZ", ()),
    ("iom-uz", "mission", "UZ", ("--suite", "x25519")),
    (
        "ngo-uz-istiqbolli-avlod",
        "ngo",
        "UZ",
        ("--parent", "iom-uz", "--name", "Istiqbolli Avlod", "--valid-days", "10"),
    ),
)


def _run(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def _ok(*args: str | Path) -> str:
    result = _run(*args)
    assert result.exit_code == 0, result.output
    return result.output


def _fails(*args: str | Path) -> str:
    result = _run(*args)
    assert result.exit_code != 0, result.output
    return result.output


@pytest.fixture
def world(tmp_path: Path) -> dict[str, Path]:
    """An authority, three participants and a directory listing all three."""
    paths = {"auth": tmp_path / "auth", "dir": tmp_path / "directory.json"}
    _ok("init", "--role", "authority", "--out", paths["auth"])
    for pid, role, country, extra in PARTICIPANTS:
        paths[pid] = tmp_path / pid
        _ok("init", "--id", pid, "--role", role, "--country", country, "--out", paths[pid], *extra)
    _ok("directory", "new", "--authority", paths["auth"], "--out", paths["dir"])
    for pid, *_ in PARTICIPANTS:
        card = paths[pid] / "participant.json"
        out = _ok("directory", "add", paths["dir"], "--card", card, "--authority", paths["auth"])
        assert f"added {pid}" in out
    return paths


def test_whole_flow(world: dict[str, Path]) -> None:
    """Init, new, add x3, show, verify, revoke, check and install work together."""
    auth_pub = world["auth"] / "authority.pub"
    shown = _ok("directory", "show", world["dir"], "--authority-key", auth_pub)
    assert "serial 4" in shown and "signature valid" in shown
    assert "ngo-uz-istiqbolli-avlod" in shown and "parent=iom-uz" in shown
    assert '"Istiqbolli Avlod"' in shown
    assert "x25519-hkdfsha256-aes256gcm" in shown

    assert _ok("directory", "verify", world["dir"], "--authority-key", auth_pub).strip() == (
        "valid, serial 4"
    )

    card = json.loads((world["iom-kz"] / "participant.json").read_text())
    kid = card["keys"][0]["kid"]
    _ok(
        "directory",
        "revoke",
        world["dir"],
        "--id",
        "iom-kz",
        "--key",
        kid,
        "--at",
        "2026-01-01T00:00:00Z",
        "--authority",
        world["auth"],
    )
    listed = json.loads(_ok("directory", "show", world["dir"], "--json"))
    assert listed["serial"] == 5
    assert listed["participants"][0]["keys"][0]["revoked_at"] == "2026-01-01T00:00:00Z"

    checked = _ok("directory", "check", world["dir"], "--authority-key", auth_pub, "--days", "30")
    warnings = [line for line in checked.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2
    assert all("ngo-uz-istiqbolli-avlod" in w and "expires in 10 days" in w for w in warnings)
    assert "iom-kz" not in checked

    home = world["iom-uz"]
    pin_authority(home, auth_pub)
    assert "installed serial 5" in _ok("directory", "install", world["dir"], "--home", home)
    assert load_home_directory(home).serial == 5


def test_install_refuses_rollback(world: dict[str, Path]) -> None:
    """Installing an older directory after a newer one fails and keeps the newer."""
    home = world["iom-uz"]
    pin_authority(home, world["auth"] / "authority.pub")
    old = world["dir"].read_bytes()
    _ok("directory", "sign", world["dir"], "--authority", world["auth"])
    _ok("directory", "install", world["dir"], "--home", home)
    world["dir"].write_bytes(old)
    out = _fails("directory", "install", world["dir"], "--home", home)
    assert "directory_rollback" in out
    assert load_home_directory(home).serial == 5


def test_install_refuses_a_serial_below_the_homes_floor(world: dict[str, Path]) -> None:
    """After serial 5, an older directory copied over directory.json and installed is refused."""
    home = world["iom-uz"]
    pin_authority(home, world["auth"] / "authority.pub")
    old = world["dir"].read_bytes()
    _ok("directory", "sign", world["dir"], "--authority", world["auth"])
    _ok("directory", "install", world["dir"], "--home", home)
    (home / "directory.json").write_bytes(old)
    (world["dir"].parent / "old.json").write_bytes(old)
    out = _fails("directory", "install", world["dir"].parent / "old.json", "--home", home)
    assert "directory_rollback" in out and "serial 4 is older than serial 5" in out
    assert "installed serial 5" in _ok("directory", "install", world["dir"], "--home", home)


def _card(world: dict[str, Path], pid: str, **update: object) -> tuple[Path, dict[str, object]]:
    """`pid`'s card with `update` applied, written beside the directory."""
    card: dict[str, object] = json.loads((world[pid] / "participant.json").read_text())
    card.update(update)
    path = world["dir"].parent / f"{pid}-new.json"
    path.write_text(json.dumps(card))
    return path, card


def test_add_keeps_a_revoked_key_the_new_card_leaves_out(world: dict[str, Path]) -> None:
    """A replacement card without a revoked key keeps it revoked and says so."""
    old_keys: list[dict[str, str]] = json.loads((world["iom-kz"] / "participant.json").read_text())[
        "keys"
    ]
    kid = old_keys[0]["kid"]
    _ok("directory", "revoke", world["dir"], "--id", "iom-kz", "--key", kid,
        "--at", "2026-01-01T00:00:00Z", "--authority", world["auth"])  # fmt: skip
    card, _ = _card(world, "iom-kz", keys=old_keys[1:])
    out = _ok("directory", "add", world["dir"], "--card", card, "--authority", world["auth"])
    assert "updated iom-kz, serial 6" in out
    assert f"key {kid} kept (sign, revoked 2026-01-01T00:00:00+00:00): not on the new card" in out
    listed = json.loads(_ok("directory", "show", world["dir"], "--json"))
    keys = {k["kid"]: k for k in listed["participants"][0]["keys"]}
    assert keys[kid]["revoked_at"] == "2026-01-01T00:00:00Z"


def test_add_refuses_a_change_of_role_and_parent_unless_allowed(world: dict[str, Path]) -> None:
    """An NGO's card turned into a mission's is refused; --allow-change role,parent allows it."""
    pid = "ngo-uz-istiqbolli-avlod"
    card, _ = _card(world, pid, role="mission", parent=None)
    before = world["dir"].read_bytes()
    add = ("directory", "add", world["dir"], "--card", card, "--authority", world["auth"])
    out = _fails(*add)
    assert "card_change_refused" in out
    assert "role ngo -> mission, parent iom-uz -> none" in out
    assert world["dir"].read_bytes() == before
    assert "card_change_refused" in _fails(*add, "--allow-change", "role")
    out = _ok(*add, "--allow-change", "role,parent")
    assert "role: ngo -> mission" in out and "parent: iom-uz -> none" in out
    listed = json.loads(_ok("directory", "show", world["dir"], "--json"))
    assert listed["participants"][2]["role"] == "mission"


def test_add_names_no_change_and_refuses_unknown_fields(world: dict[str, Path]) -> None:
    """Re-adding the same card prints that nothing changed; --allow-change takes known names."""
    card = world["iom-uz"] / "participant.json"
    add = ("directory", "add", world["dir"], "--card", card, "--authority", world["auth"])
    assert "no change to the card" in _ok(*add)
    result = _run(*add, "--allow-change", "role,keys")
    assert result.exit_code == 2
    assert "name some of role, parent, country" in result.output


def test_verify_refusals(world: dict[str, Path], tmp_path: Path) -> None:
    """verify names the reason: min serial, another authority, tampering."""
    auth_pub = world["auth"] / "authority.pub"
    out = _fails(
        "directory", "verify", world["dir"], "--authority-key", auth_pub, "--min-serial", "9"
    )
    assert "directory_rollback" in out
    _ok("init", "--role", "authority", "--out", tmp_path / "other")
    other_pub = tmp_path / "other" / "authority.pub"
    out = _fails("directory", "verify", world["dir"], "--authority-key", other_pub)
    assert "directory_signature_invalid" in out
    world["dir"].write_bytes(world["dir"].read_bytes().replace(b'"payload": "e', b'"payload": "f'))
    out = _fails("directory", "verify", world["dir"], "--authority-key", auth_pub)
    assert "directory_signature_invalid" in out


def test_mutation_needs_the_signing_authority(world: dict[str, Path], tmp_path: Path) -> None:
    """Another authority cannot add to, sign or revoke in the directory; the file is unchanged."""
    _ok("init", "--role", "authority", "--out", tmp_path / "other")
    before = world["dir"].read_bytes()
    card = world["iom-kz"] / "participant.json"
    other = tmp_path / "other"
    assert "directory_signature_invalid" in _fails(
        "directory", "add", world["dir"], "--card", card, "--authority", other
    )
    assert "directory_signature_invalid" in _fails(
        "directory", "sign", world["dir"], "--authority", other
    )
    assert world["dir"].read_bytes() == before


def test_add_ngo_without_its_mission_refused(tmp_path: Path) -> None:
    """Adding an NGO whose mission is not yet listed fails with the reason."""
    _ok("init", "--role", "authority", "--out", tmp_path / "auth")
    _ok("init", "--id", "ngo-kz-rodnik", "--role", "ngo", "--country", "KZ", "--parent", "iom-kz",
        "--out", tmp_path / "ngo")  # fmt: skip
    _ok("directory", "new", "--authority", tmp_path / "auth", "--out", tmp_path / "d.json")
    out = _fails("directory", "add", tmp_path / "d.json", "--card", tmp_path / "ngo" /
                 "participant.json", "--authority", tmp_path / "auth")  # fmt: skip
    assert "directory_malformed" in out and "parent" in out


def test_init_refusals(tmp_path: Path) -> None:
    """init refuses to overwrite keys and demands --id and --country for participants."""
    _ok("init", "--id", "iom-kz", "--role", "mission", "--country", "KZ", "--out", tmp_path / "kz")
    out = _fails(
        "init", "--id", "iom-kz", "--role", "mission", "--country", "KZ", "--out", tmp_path / "kz"
    )
    assert "refusing to overwrite" in out
    assert "--country" in _fails("init", "--id", "iom-kz", "--role", "mission", "--out", tmp_path)
    _ok("init", "--role", "authority", "--out", tmp_path / "a")
    assert "refusing to overwrite" in _fails("init", "--role", "authority", "--out", tmp_path / "a")


def test_new_refuses_existing_file(world: dict[str, Path]) -> None:
    """directory new never overwrites an existing directory."""
    before = world["dir"].read_bytes()
    _fails("directory", "new", "--authority", world["auth"], "--out", world["dir"])
    assert world["dir"].read_bytes() == before


def test_show_unverified_says_so(world: dict[str, Path]) -> None:
    """show without --authority-key says the signature was not checked."""
    assert "NOT checked" in _ok("directory", "show", world["dir"])


def _sending_home(world: dict[str, Path]) -> tuple[Path, Path]:
    """iom-kz's home with the directory installed, and a return request payload file."""
    home = world["iom-kz"]
    pin_authority(home, world["auth"] / "authority.pub")
    _ok("directory", "install", world["dir"], "--home", home)
    payload = home.parent / "request.json"
    payload.write_bytes(encode_payload(example(MessageKind.RETURN_REQUEST)))
    return home, payload


def test_send_refuses_hybrid_and_classical_recipients_together(world: dict[str, Path]) -> None:
    """`trm send` to a hybrid and an X25519-only recipient fails in one line naming the latter."""
    home, payload = _sending_home(world)
    to = "iom-uz,ngo-uz-istiqbolli-avlod"
    result = _run("send", "return_request", "--home", home, "--to", to,
                  "--case", EXAMPLE_CASE, "--payload", payload)  # fmt: skip
    assert result.exit_code == 1
    reason = result.stderr.strip()
    assert reason.startswith("Error: classical_downgrade: recipient 'iom-uz' holds only")
    assert "--allow-classical" in reason and "\n" not in reason
    status = json.loads(_ok("outbox", "status", "--home", home, "--json"))
    assert status["pending"] == 0


def test_send_allow_classical_seals_and_says_what_it_costs(world: dict[str, Path]) -> None:
    """With --allow-classical the envelope is queued and stderr says X25519 now bounds everyone."""
    home, payload = _sending_home(world)
    to = "iom-uz,ngo-uz-istiqbolli-avlod"
    result = _run("send", "return_request", "--home", home, "--to", to, "--case", EXAMPLE_CASE,
                  "--payload", payload, "--allow-classical")  # fmt: skip
    assert result.exit_code == 0, result.output
    envelope_id = result.stdout.strip()
    assert (
        f"warning: iom-uz holds only a classical X25519 key: envelope {envelope_id} is only "
        "as strong as X25519 for every recipient" in result.stderr
    )
    assert json.loads(_ok("outbox", "status", "--home", home, "--json"))["pending"] == 1


def test_witnesses_are_named_and_kept_across_later_changes(world: dict[str, Path]) -> None:
    """`trm directory witnesses` signs the witnesses and quorum; later edits keep them."""
    auth_pub = world["auth"] / "authority.pub"
    out = _ok(
        "directory", "witnesses", world["dir"], "--witness", "iom-kz", "--witness", "iom-uz",
        "--quorum", "2", "--authority", world["auth"],
    )  # fmt: skip
    assert "witnesses iom-kz, iom-uz, quorum 2, serial 5" in out
    _ok("directory", "sign", world["dir"], "--authority", world["auth"])
    shown = _ok("directory", "show", world["dir"], "--authority-key", auth_pub)
    assert "serial 6" in shown and "witnesses iom-kz, iom-uz, quorum 2" in shown
    refused = _fails(
        "directory", "witnesses", world["dir"], "--witness", "ngo-uz-istiqbolli-avlod",
        "--quorum", "1", "--authority", world["auth"],
    )  # fmt: skip
    assert "not a mission or an auditor" in refused
    assert "serial 6" in _ok("directory", "show", world["dir"], "--authority-key", auth_pub)
