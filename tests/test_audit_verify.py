"""The auditor's offline verification: each kind of tampering is caught at the first bad entry."""

from __future__ import annotations

import base64
import json
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from test_auditlog import KZ, NGO, ROUTING, T0, UZ, World, append_all, make_world

from broker.database import open_database
from broker.directory import Directory, Role, load_directory, revoke_key, sign_directory
from broker.envelope import seal
from broker.errors import AuditError, LogTampered
from broker.keys import Sender
from schemas.base import MessageKind
from schemas.examples import example
from services import audit
from services.audit import VerifyReport, diff_states, replay_export, verify_export
from services.auditlog import LogEntry, format_time, parse_time
from services.cases import Stage
from services.checkpoint import Checkpoint, open_checkpoint, sign_checkpoint
from services.merkle import MerkleTree

CASES = ("iom-kz.KZ-2026-0101", "iom-kz.KZ-2026-0102", "iom-kz.KZ-2026-0103")
CHECKPOINT_AFTER = (4, 8)  # and a final one after the last entry


@dataclass(frozen=True)
class Export:
    """A genuine export and what went into it."""

    path: Path
    world: World
    entries: int
    notes: dict[int, bytes]


def build_log(world: World, path: Path, items: list[tuple[bytes, datetime, str]]) -> Export:
    """A fresh SQLite log holding `items`, checkpointed after 4, 8 and all entries, exported."""
    engine = open_database(f"sqlite:///{path.with_suffix('.db')}")
    try:
        log = world.log(engine)
        for start, end in zip((0, *CHECKPOINT_AFTER), (*CHECKPOINT_AFTER, len(items)), strict=True):
            append_all(log, items[start:end])
            log.checkpoint(items[end - 1][1])
        log.export(path, directory=world.directory)
        with engine.connect() as conn:
            rows = conn.execute(sa.text("SELECT size, note FROM log_checkpoints")).all()
    finally:
        engine.dispose()
    return Export(path, world, len(items), {int(r.size): r.note.encode() for r in rows})


def story_items(world: World) -> list[tuple[bytes, datetime, str]]:
    """Three cases' stories interleaved (15 envelopes) plus two recorded rejections."""
    stories = [world.seal_story(case, T0 + timedelta(minutes=i)) for i, case in enumerate(CASES)]
    items: list[tuple[bytes, datetime, str]] = []
    for step in range(5):
        for story in stories:
            items.append((*story[step], "ok"))
    broken = bytearray(items[2][0])
    broken[-5] ^= 0x10
    items.insert(6, (bytes(broken), items[6][1], "rejected:bad_signature"))
    items.insert(10, (b"TRM1 garbage", items[10][1], "rejected:malformed"))
    return sorted(items, key=lambda item: item[1])


@pytest.fixture(scope="module")
def module_world(tmp_path_factory: pytest.TempPathFactory) -> World:
    """Keys for this module."""
    return make_world(tmp_path_factory.mktemp("verify-world"))


@pytest.fixture(scope="module")
def genuine(module_world: World, tmp_path_factory: pytest.TempPathFactory) -> Export:
    """An honest 17-entry export with checkpoints of sizes 4, 8 and 17."""
    path = tmp_path_factory.mktemp("genuine") / "audit.jsonl"
    return build_log(module_world, path, story_items(module_world))


# --- editing exports ------------------------------------------------------------------------


def read_lines(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_lines(path: Path, lines: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines))
    return path


def position(lines: list[dict[str, Any]], index: int) -> int:
    """The line number of entry `index`."""
    return next(
        i for i, line in enumerate(lines) if line["type"] == "entry" and line["index"] == index
    )


def leaf_of(line: dict[str, Any]) -> bytes:
    return LogEntry(
        line["index"],
        line["received_at"],
        line["verification"],
        bytes.fromhex(line["prev"]),
        base64.b64decode(line["envelope"]),
    ).leaf_hash()


def tampered(genuine: Export, tmp_path: Path, edit: Callable[[list[dict[str, Any]]], None]) -> Path:
    lines = read_lines(genuine.path)
    edit(lines)
    return write_lines(tmp_path / "tampered.jsonl", lines)


LAYOUTS = ((1, None), (2, 1), (2, 2500))
"""(workers, bytes per range): one process over the default ranges; two workers over ranges
of one line each and of about two lines, so that ranges start at every kind of line."""


def verify_all_ways(path: Path, directory: Directory, **kw: Any) -> list[VerifyReport]:
    """The export verified in every layout of `LAYOUTS`."""
    reports = []
    for workers, chunk in LAYOUTS:
        with pytest.MonkeyPatch.context() as mp:
            if chunk is not None:
                mp.setattr(audit, "CHUNK_BYTES", chunk)
            reports.append(verify_export(path, directory, workers=workers, **kw))
    return reports


def first_bad(path: Path, world: World | Directory, **kw: Any) -> LogTampered:
    """The problem reported, the same whether verified in one process or split across workers."""
    directory = world.directory if isinstance(world, World) else world
    errors = []
    for workers, chunk in LAYOUTS:
        with pytest.MonkeyPatch.context() as mp, pytest.raises(LogTampered) as caught:
            if chunk is not None:
                mp.setattr(audit, "CHUNK_BYTES", chunk)
            verify_export(path, directory, workers=workers, **kw)
        errors.append(caught.value)
    assert {(e.index, e.problem) for e in errors} == {(errors[0].index, errors[0].problem)}
    return errors[0]


def flip_bit(field: str, line: dict[str, Any]) -> None:
    """Flip one bit in the value of `field`, re-encoded as the export encodes it."""
    if field == "index":
        line["index"] ^= 1
    elif field == "received_at":
        moment = parse_time(line["received_at"])
        line["received_at"] = format_time(moment.replace(microsecond=moment.microsecond ^ 1))
    elif field == "verification":
        text = bytearray(line["verification"].encode())
        text[-1] ^= 0x01
        line["verification"] = text.decode()
    elif field == "prev":
        raw = bytearray(bytes.fromhex(line["prev"]))
        raw[17] ^= 0x04
        line["prev"] = raw.hex()
    else:
        raw = bytearray(base64.b64decode(line["envelope"]))
        raw[len(raw) // 2] ^= 0x80
        line["envelope"] = base64.b64encode(raw).decode()


# --- the honest export ------------------------------------------------------------------------


def test_genuine_export_verifies(genuine: Export) -> None:
    """The honest export is intact: every entry, envelope and checkpoint accounted for."""
    reports = verify_all_ways(genuine.path, genuine.world.directory)
    report = reports[0]
    assert (report.entries, report.checkpoints) == (17, 3)
    assert (report.envelopes_ok, report.rejected_recorded, report.rejected_confirmed) == (15, 2, 2)
    assert (report.log_id, report.origin) == (ROUTING, f"trm.routing/{ROUTING}")
    assert "intact: 17 entries" in report.summary()
    assert reports == [report] * len(LAYOUTS)


def test_progress_reports_each_range_up_to_the_whole_export(genuine: Export) -> None:
    """Verifying over small ranges reports bytes read after each, rising to the whole export."""
    seen: list[tuple[int, int]] = []
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(audit, "CHUNK_BYTES", 2500)
        verify_export(
            genuine.path, genuine.world.directory, workers=1, progress=lambda *p: seen.append(p)
        )
    done = [d for d, _ in seen]
    assert len(seen) > 1 and done == sorted(done) and len({t for _, t in seen}) == 1
    assert done[-1] == seen[0][1] > 0


def respelled(path: Path, tmp_path: Path) -> Path:
    """The same export in other valid JSON: spaces after separators, every '/' escaped."""
    lines = [json.dumps(line).replace("/", "\\/") for line in read_lines(path)]
    out = tmp_path / "respelled.jsonl"
    out.write_text("".join(line + "\n" for line in lines))
    return out


def test_export_in_other_json_spelling_verifies_the_same(genuine: Export, tmp_path: Path) -> None:
    """Lines spelled otherwise than the exporter writes them hold the same values and verify."""
    path = respelled(genuine.path, tmp_path)
    assert b"\\/" in path.read_bytes()
    reports = verify_all_ways(path, genuine.world.directory)
    assert reports == verify_all_ways(genuine.path, genuine.world.directory)


def test_replay_rebuilds_each_case(genuine: Export) -> None:
    """Replaying the export alone brings each case to reception by the NGO, in log order."""
    authority = genuine.world.authority.public_key()
    states = replay_export(genuine.path, authority=authority)
    assert sorted(states) == sorted(CASES)
    assert {s.stage for s in states.values()} == {Stage.RECEIVED}
    assert all(not s.anomalies for s in states.values())
    one = replay_export(genuine.path, genuine.world.directory, case=CASES[1])
    assert list(one) == [CASES[1]] and one[CASES[1]] == states[CASES[1]]


def _reroled(world: World, signer: Ed25519PrivateKey) -> bytes:
    """The directory with the NGO listed as a mission (and no parent), signed by `signer`."""
    cards = tuple(
        c.model_copy(update={"role": Role.MISSION, "parent": None}) if c.id == NGO else c
        for c in world.body.participants
    )
    return sign_directory(world.body.model_copy(update={"participants": cards}), signer)


def test_replay_refuses_an_embedded_directory_not_signed_by_the_authority(
    genuine: Export, tmp_path: Path
) -> None:
    """A re-roled directory signed by a throwaway key in the header is refused, not replayed."""
    world = genuine.world
    forged = _reroled(world, Ed25519PrivateKey.generate())

    def edit(lines: list[dict[str, Any]]) -> None:
        lines[0]["directory"] = base64.b64encode(forged).decode()

    path = tampered(genuine, tmp_path, edit)
    with pytest.raises(AuditError, match="does not verify with the authority key"):
        replay_export(path, authority=world.authority.public_key())
    # The same re-roling signed by the authority would change what the replay shows.
    genuine_states = replay_export(genuine.path, world.directory)
    reroled = load_directory(
        _reroled(world, world.authority), authority=world.authority.public_key()
    )
    assert replay_export(path, reroled) != genuine_states
    assert replay_export(path, world.directory) == genuine_states


def test_replay_without_a_verified_directory_is_refused(genuine: Export) -> None:
    """Replay with neither a directory nor the authority key to check the embedded one refuses."""
    with pytest.raises(AuditError, match="verified directory"):
        replay_export(genuine.path)


def test_diff_states_names_differences(genuine: Export) -> None:
    """diff_states is empty for equal states and names a missing case and a changed stage."""
    directory = genuine.world.directory
    states = replay_export(genuine.path, directory)
    assert diff_states(states, dict(states)) == []
    fewer = {k: v for k, v in states.items() if k != CASES[0]}
    assert diff_states(states, fewer) == [f"case {CASES[0]}: only in the first (log)"]
    early = {**states, CASES[2]: replay_export(genuine.path, directory, case=CASES[1])[CASES[1]]}
    assert any(d.startswith(f"case {CASES[2]}: ") for d in diff_states(states, early))


# --- tampered entries ---------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["index", "received_at", "verification", "prev", "envelope"])
@pytest.mark.parametrize("index", [0, 5, 12])
def test_flipped_bit_in_any_field_names_the_entry(
    genuine: Export, tmp_path: Path, field: str, index: int
) -> None:
    """One flipped bit in any field of entry k is reported at entry k."""
    path = tampered(genuine, tmp_path, lambda lines: flip_bit(field, lines[position(lines, index)]))
    error = first_bad(path, genuine.world)
    assert error.index == index
    again = first_bad(respelled(path, tmp_path), genuine.world)
    assert (again.index, again.problem) == (error.index, error.problem)


def test_non_canonical_envelope_padding_is_named(genuine: Export, tmp_path: Path) -> None:
    """Base64 whose unused padding bits are set decodes to the same bytes, and is refused."""
    lines = read_lines(genuine.path)
    k = next(ln["index"] for ln in lines if ln.get("envelope", "").endswith("="))

    def edit(lines: list[dict[str, Any]]) -> None:
        line = lines[position(lines, k)]
        text = line["envelope"].rstrip("=")
        alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
        odd = text[:-1] + alphabet[alphabet.index(text[-1]) | 1] + line["envelope"][len(text) :]
        assert odd != line["envelope"]
        assert base64.b64decode(odd) == base64.b64decode(line["envelope"])
        line["envelope"] = odd

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == k and "not canonical base64" in error.problem


def test_flipped_bit_in_a_rejected_entry_is_caught(genuine: Export, tmp_path: Path) -> None:
    """Changing a rejected entry's reason is caught at that entry by the chain."""
    lines = read_lines(genuine.path)
    k = next(line["index"] for line in lines if line.get("verification", "").startswith("rej"))
    path = tampered(genuine, tmp_path, lambda ls: flip_bit("verification", ls[position(ls, k)]))
    error = first_bad(path, genuine.world)
    assert error.index == k and "altered" in error.problem


def test_deleted_entry_is_named(genuine: Export, tmp_path: Path) -> None:
    """Removing entry k is reported as entry k missing."""
    path = tampered(genuine, tmp_path, lambda lines: lines.pop(position(lines, 6)))
    error = first_bad(path, genuine.world)
    assert error.index == 6 and "missing" in error.problem


def test_deleted_entry_with_renumbering_is_named(genuine: Export, tmp_path: Path) -> None:
    """Removing entry k and renumbering the rest breaks the chain at entry k."""

    def edit(lines: list[dict[str, Any]]) -> None:
        lines.pop(position(lines, 6))
        for line in lines:
            if line["type"] == "entry" and line["index"] > 6:
                line["index"] -= 1

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 6 and "prev" in error.problem


def _extra_envelope(world: World) -> bytes:
    return seal(
        example(MessageKind.REMINDER),
        case=CASES[0],
        sender=world.sender(KZ),
        recipients=[UZ],
        directory=world.directory,
        seq=9,
        now=T0 + timedelta(minutes=3),
    ).raw


def test_inserted_entry_is_named(genuine: Export, tmp_path: Path) -> None:
    """A valid envelope inserted at k, chained to k-1 and the rest renumbered, is named k."""
    world = genuine.world
    extra = _extra_envelope(world)

    def edit(lines: list[dict[str, Any]]) -> None:
        at = position(lines, 7)
        before = lines[position(lines, 6)]
        new = {
            "type": "entry",
            "index": 7,
            "received_at": format_time(T0 + timedelta(minutes=25)),
            "verification": "ok",
            "prev": leaf_of(before).hex(),
            "envelope": base64.b64encode(extra).decode(),
        }
        for line in lines[at:]:
            if line["type"] == "entry":
                line["index"] += 1
        lines.insert(at, new)

    error = first_bad(tampered(genuine, tmp_path, edit), world)
    assert error.index == 7 and "inserted" in error.problem


def test_inserted_entry_without_renumbering_is_caught(genuine: Export, tmp_path: Path) -> None:
    """An entry inserted with a repeated index is reported where the sequence repeats."""

    def edit(lines: list[dict[str, Any]]) -> None:
        copy = dict(lines[position(lines, 7)])
        copy["envelope"] = base64.b64encode(_extra_envelope(genuine.world)).decode()
        lines.insert(position(lines, 7), copy)

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 8 and "again" in error.problem


@pytest.mark.parametrize("index", [-1, 2**64, 2**70])
def test_impossible_index_is_named(genuine: Export, tmp_path: Path, index: int) -> None:
    """An entry holding an index no entry can have is reported where it stands."""

    def edit(lines: list[dict[str, Any]]) -> None:
        lines[position(lines, 6)]["index"] = index

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 6 and f"holds entry {index}" in error.problem


def test_reordered_entries_are_named(genuine: Export, tmp_path: Path) -> None:
    """Two swapped entries are reported at the first of them."""

    def edit(lines: list[dict[str, Any]]) -> None:
        a, b = position(lines, 9), position(lines, 10)
        lines[a], lines[b] = lines[b], lines[a]

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 9 and "missing" in error.problem


def test_reordered_entries_with_renumbering_are_named(genuine: Export, tmp_path: Path) -> None:
    """Two swapped entries that keep the index sequence are reported at the first of them."""

    def edit(lines: list[dict[str, Any]]) -> None:
        a, b = position(lines, 9), position(lines, 10)
        lines[a], lines[b] = lines[b], lines[a]
        lines[a]["index"], lines[b]["index"] = 9, 10

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 9


def test_duplicated_entry_is_named(genuine: Export, tmp_path: Path) -> None:
    """An entry repeated right after itself is reported where the repeat stands."""
    path = tampered(
        genuine, tmp_path, lambda lines: lines.insert(position(lines, 3), lines[position(lines, 3)])
    )
    error = first_bad(path, genuine.world)
    assert error.index == 4 and "again" in error.problem


@pytest.mark.parametrize(
    "cut", [lambda line: "{not json", lambda line: line[: line.index('"envelope":"') + 12] + "}"]
)
def test_malformed_line_is_named(
    genuine: Export, tmp_path: Path, cut: Callable[[str], str]
) -> None:
    """A line that is not JSON is reported at the entry expected there."""
    path = tmp_path / "bad.jsonl"
    lines = genuine.path.read_text().splitlines()
    at = position(read_lines(genuine.path), 11)
    lines[at] = cut(lines[at])
    path.write_text("\n".join(lines) + "\n")
    error = first_bad(path, genuine.world)
    assert error.index == 11 and "not JSON" in error.problem


def test_missing_header_is_refused(genuine: Export, tmp_path: Path) -> None:
    """An export without its header line names the export, not an entry."""
    path = tampered(genuine, tmp_path, lambda lines: lines.pop(0))
    error = first_bad(path, genuine.world)
    assert error.index is None and "header" in error.problem


# --- truncation and checkpoints --------------------------------------------------------------


def test_tail_truncated_after_a_checkpoint_is_named(genuine: Export, tmp_path: Path) -> None:
    """Entries removed after checkpoint 8 while the last checkpoint stays: first missing named."""

    def edit(lines: list[dict[str, Any]]) -> None:
        lines[:] = [ln for ln in lines if ln["type"] != "entry" or ln["index"] < 8]

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 8 and "entries 8..16 removed" in error.problem


def test_truncation_with_its_checkpoint_needs_a_trusted_checkpoint(
    genuine: Export, tmp_path: Path
) -> None:
    """Cutting the tail together with its checkpoint is only caught against a kept checkpoint."""

    def edit(lines: list[dict[str, Any]]) -> None:
        cut = position(lines, 8)
        lines[:] = lines[:cut]

    path = tampered(genuine, tmp_path, edit)
    assert verify_export(path, genuine.world.directory, workers=1).entries == 8
    error = first_bad(path, genuine.world, trusted_checkpoint=genuine.notes[17])
    assert error.index == 8 and "trusted checkpoint" in error.problem


def test_trusted_checkpoint_of_another_history_is_caught(
    genuine: Export, module_world: World, tmp_path: Path
) -> None:
    """A kept checkpoint whose root the export's entries do not reproduce is reported."""
    routing = module_world.sender(ROUTING)
    forged = sign_checkpoint(
        Checkpoint(f"trm.routing/{ROUTING}", 10, b"\x07" * 32, T0 + timedelta(hours=1)),
        routing.key,
        f"{ROUTING}/{routing.kid}",
    )
    error = first_bad(genuine.path, module_world, trusted_checkpoint=forged)
    assert error.index == 9 and "not consistent" in error.problem


def test_entries_after_the_last_checkpoint_are_named(genuine: Export, tmp_path: Path) -> None:
    """Dropping the final checkpoint leaves entries 8.. uncovered, and says so."""
    path = tampered(genuine, tmp_path, lambda lines: lines.pop())
    error = first_bad(path, genuine.world)
    assert error.index == 8 and "not covered" in error.problem


def _checkpoint_line(lines: list[dict[str, Any]], size: int) -> dict[str, Any]:
    return lines[position(lines, size - 1) + 1]


def test_checkpoint_with_forged_signature_is_named(genuine: Export, tmp_path: Path) -> None:
    """A checkpoint signed by another key under the routing key's name is reported."""
    routing = genuine.world.sender(ROUTING)

    def edit(lines: list[dict[str, Any]]) -> None:
        line = _checkpoint_line(lines, 8)
        cp = open_checkpoint(
            line["note"].encode(), key=routing.key.public_key(), key_name=line["key_name"]
        )
        line["note"] = sign_checkpoint(cp, Ed25519PrivateKey.generate(), line["key_name"]).decode()

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 7 and "checkpoint" in error.problem


def test_checkpoint_with_wrong_root_is_named(genuine: Export, tmp_path: Path) -> None:
    """A properly signed checkpoint whose root is not that of its entries is reported."""
    routing = genuine.world.sender(ROUTING)

    def edit(lines: list[dict[str, Any]]) -> None:
        line = _checkpoint_line(lines, 8)
        cp = Checkpoint(f"trm.routing/{ROUTING}", 8, b"\x01" * 32, T0 + timedelta(hours=1))
        line["note"] = sign_checkpoint(cp, routing.key, line["key_name"]).decode()

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 7 and "do not hash to the root" in error.problem


def test_fork_is_named(genuine: Export, tmp_path: Path) -> None:
    """Two signed checkpoints of the same size with different roots are reported as a fork."""
    routing = genuine.world.sender(ROUTING)

    def edit(lines: list[dict[str, Any]]) -> None:
        line = _checkpoint_line(lines, 8)
        cp = Checkpoint(f"trm.routing/{ROUTING}", 8, b"\x02" * 32, T0 + timedelta(hours=1))
        other = {**line, "note": sign_checkpoint(cp, routing.key, line["key_name"]).decode()}
        lines.insert(position(lines, 7) + 2, other)

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 7 and "fork" in error.problem


def test_checkpoint_of_another_log_is_named(genuine: Export, tmp_path: Path) -> None:
    """A checkpoint signed by a participant other than the log's key is reported."""

    def edit(lines: list[dict[str, Any]]) -> None:
        _checkpoint_line(lines, 4)["key_name"] = f"{KZ}/whatever"

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index == 3 and "not a key of the log" in error.problem


# --- whose log it is ---------------------------------------------------------------------------

NGO_ORIGIN, ROUTING_ORIGIN = f"trm.routing/{NGO}", f"trm.routing/{ROUTING}"


def resigned_by_ngo(
    genuine: Export, tmp_path: Path, *, origin: str, header_key: str, drop: int = 6
) -> Path:
    """The genuine log rebuilt without entry `drop` and every checkpoint re-signed by the NGO.

    Entries after the dropped one are renumbered and re-chained, checkpoints
    re-rooted over the new leaves and signed under the NGO's own key name,
    with `origin` in their body; the header names `header_key` as log_key.
    """
    ngo = genuine.world.sender(NGO)
    key_name = f"{NGO}/{ngo.kid}"
    kept = [ln for ln in read_lines(genuine.path) if ln["type"] == "entry" and ln["index"] != drop]
    header = {**read_lines(genuine.path)[0], "origin": origin, "log_key": header_key}
    lines: list[dict[str, Any]] = [{**header, "key_name": key_name}]
    prev, leaves = bytes(32), []
    for index, line in enumerate(kept):
        entry = {**line, "index": index, "prev": prev.hex()}
        prev = leaf_of(entry)
        leaves.append(prev)
        lines.append(entry)
        if index + 1 in (*CHECKPOINT_AFTER, len(kept)):
            when = parse_time(entry["received_at"]) + timedelta(seconds=1)
            root = MerkleTree.from_leaves(leaves).root()
            note = sign_checkpoint(Checkpoint(origin, index + 1, root, when), ngo.key, key_name)
            lines.append({"type": "checkpoint", "key_name": key_name, "note": note.decode()})
    return write_lines(tmp_path / "forged.jsonl", lines)


def test_export_resigned_by_an_ngo_naming_itself_is_refused(
    genuine: Export, tmp_path: Path
) -> None:
    """An NGO's rebuilt log, signed by its key and naming itself the log, is not a log."""
    path = resigned_by_ngo(genuine, tmp_path, origin=NGO_ORIGIN, header_key=NGO)
    error = first_bad(path, genuine.world)
    assert error.index is None
    assert f"{NGO!r} is a ngo in the directory" in error.problem
    assert "not a routing participant" in error.problem


def test_export_resigned_by_an_ngo_under_the_routing_origin_is_refused(
    genuine: Export, tmp_path: Path
) -> None:
    """Checkpoints naming the routing log but signed by the NGO: the header's claim is refused."""
    path = resigned_by_ngo(genuine, tmp_path, origin=ROUTING_ORIGIN, header_key=NGO)
    error = first_bad(path, genuine.world)
    assert error.index is None
    assert f"claims log_key {NGO!r}" in error.problem
    honest_header = resigned_by_ngo(genuine, tmp_path, origin=ROUTING_ORIGIN, header_key=ROUTING)
    error = first_bad(honest_header, genuine.world)
    assert error.index is None and f"claims key_name '{NGO}/" in error.problem


def test_checkpoints_signed_by_an_ngo_under_an_honest_header_are_named(
    genuine: Export, tmp_path: Path
) -> None:
    """With the header put back as the routing service wrote it, each NGO checkpoint is refused."""
    path = resigned_by_ngo(genuine, tmp_path, origin=ROUTING_ORIGIN, header_key=ROUTING)
    lines = read_lines(path)
    lines[0] = read_lines(genuine.path)[0]
    error = first_bad(write_lines(path, lines), genuine.world)
    assert error.index == 0 and "entries 0..15 carry no signature" in error.problem
    assert f"after entry 3: signed under key name '{NGO}/" in error.problem
    assert f"not a key of the log {ROUTING!r}" in error.problem


def test_the_log_id_the_auditor_names_is_the_one_checked(genuine: Export, tmp_path: Path) -> None:
    """--log-id pins the log: the NGO's own log is refused, the routing log verifies under it."""
    reports = verify_all_ways(genuine.path, genuine.world.directory, log_id=ROUTING)
    assert {(r.log_id, r.origin) for r in reports} == {(ROUTING, ROUTING_ORIGIN)}
    with pytest.raises(AuditError, match="not a routing participant"):
        verify_export(genuine.path, genuine.world.directory, workers=1, log_id=NGO)
    forged = resigned_by_ngo(genuine, tmp_path, origin=NGO_ORIGIN, header_key=NGO)
    error = first_bad(forged, genuine.world, log_id=ROUTING)
    assert error.index is None and f"claims origin {NGO_ORIGIN!r}" in error.problem


def test_header_claiming_another_origin_is_refused(genuine: Export, tmp_path: Path) -> None:
    """A header whose origin differs from the one the checkpoints sign is refused."""

    def edit(lines: list[dict[str, Any]]) -> None:
        lines[0]["origin"] = "trm.routing/elsewhere"

    error = first_bad(tampered(genuine, tmp_path, edit), genuine.world)
    assert error.index is None and "claims origin 'trm.routing/elsewhere'" in error.problem


def test_empty_export_needs_a_log_id(module_world: World, tmp_path: Path) -> None:
    """An export with nothing in it names no log; with --log-id it is an intact empty log."""
    engine = open_database(f"sqlite:///{tmp_path / 'empty.db'}")
    try:
        module_world.log(engine).export(tmp_path / "empty.jsonl")
    finally:
        engine.dispose()
    with pytest.raises(AuditError, match="nothing names its log"):
        verify_export(tmp_path / "empty.jsonl", module_world.directory, workers=1)
    report = verify_export(tmp_path / "empty.jsonl", module_world.directory, log_id=ROUTING)
    assert (report.entries, report.log_id) == (0, ROUTING)


# --- envelopes that do not verify -------------------------------------------------------------


def _rogue_sender(world: World) -> tuple[Sender, World]:
    """KZ's key id with another private key, and a world whose directory lists it."""
    rogue = Ed25519PrivateKey.generate()
    kz = world.sender(KZ)
    cards = []
    for card in world.body.participants:
        if card.id == KZ:
            raw = rogue.public_key().public_bytes_raw()
            keys = tuple(
                k.model_copy(update={"public": base64.b64encode(raw).decode()})
                if k.kid == kz.kid
                else k
                for k in card.keys
            )
            card = card.model_copy(update={"keys": keys})
        cards.append(card)
    body = world.body.model_copy(update={"participants": tuple(cards)})
    rogue_world = World(world.root, world.keys, world.authority, body, world.signed(body))
    return Sender(KZ, kz.kid, rogue), rogue_world


def test_envelope_resigned_by_unknown_key_is_named(module_world: World, tmp_path: Path) -> None:
    """An envelope recorded ok but signed by a key the directory does not hold is named."""
    items = story_items(module_world)
    sender, rogue_world = _rogue_sender(module_world)
    forged = seal(
        example(MessageKind.DEPARTED),
        case=CASES[0],
        sender=sender,
        recipients=[UZ],
        directory=rogue_world.directory,
        seq=7,
        now=items[11][1] - timedelta(seconds=1),
    )
    items[11] = (forged.raw, items[11][1], "ok")
    export = build_log(module_world, tmp_path / "audit.jsonl", items)
    error = first_bad(export.path, module_world)
    assert error.index == 11 and "bad_signature" in error.problem


def test_first_bad_envelope_is_deterministic_across_workers(
    module_world: World, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With bad envelopes in several chunks checked in parallel, the lowest index is reported."""
    items = story_items(module_world)
    sender, rogue_world = _rogue_sender(module_world)
    for k in (13, 5, 9):
        forged = seal(
            example(MessageKind.REMINDER),
            case=CASES[1],
            sender=sender,
            recipients=[UZ],
            directory=rogue_world.directory,
            seq=20 + k,
            now=items[k][1],
        )
        items[k] = (forged.raw, items[k][1], "ok")
    export = build_log(module_world, tmp_path / "audit.jsonl", items)
    for chunk in (1, 2500, 5000):
        monkeypatch.setattr(audit, "CHUNK_BYTES", chunk)
        for workers in (1, 2, 3):
            with pytest.raises(LogTampered) as caught:
                verify_export(export.path, module_world.directory, workers=workers)
            assert caught.value.index == 5


def test_envelope_signed_after_revocation_is_named(genuine: Export) -> None:
    """With a newer directory revoking KZ's key, KZ's first envelope received after it is named."""
    world = genuine.world
    lines = read_lines(genuine.path)
    revoked_at = T0 + timedelta(minutes=15)
    late = [
        ln["index"]
        for ln in lines
        if ln["type"] == "entry"
        and parse_time(ln["received_at"]) >= revoked_at
        and ln["verification"] == "ok"
        and b'"sender":"iom-kz"' in base64.b64decode(ln["envelope"])
    ]
    newer = world.signed(
        revoke_key(world.body, KZ, world.sender(KZ).kid, at=revoked_at, now=revoked_at)
    )
    error = first_bad(genuine.path, newer)
    assert error.index == late[0] and "revoked_key" in error.problem
    later = world.signed(
        revoke_key(world.body, KZ, world.sender(KZ).kid, at=T0 + timedelta(days=1), now=revoked_at)
    )
    assert {r.entries for r in verify_all_ways(genuine.path, later)} == {17}


def test_wrongly_rejected_envelope_is_named(module_world: World, tmp_path: Path) -> None:
    """A valid envelope recorded as rejected for its signature is reported at that entry."""
    items = story_items(module_world)
    items[4] = (items[4][0], items[4][1], "rejected:bad_signature")
    export = build_log(module_world, tmp_path / "audit.jsonl", items)
    error = first_bad(export.path, module_world)
    assert error.index == 4 and "wrongly rejected" in error.problem


def test_unreadable_export_fails_clearly(module_world: World, tmp_path: Path) -> None:
    """A missing file gives an AuditError naming it, not an OSError."""
    with pytest.raises(AuditError, match="cannot read the export"):
        verify_export(tmp_path / "absent.jsonl", module_world.directory, workers=1)
