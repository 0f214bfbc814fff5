"""`trm demo`: the three stories end to end, twice in a row, leaking nothing."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker.errors import ConfigError
from broker.management import ManagementClient
from schemas.examples import EXAMPLE_PERSON_NAME
from trm.demo import (
    DEMO_VHOST,
    NGO,
    NGO_KZ,
    REFERRAL_CASE,
    STEPS,
    UZ,
    prepare_workdir,
    run_demo,
)
from trm.reference import render

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

NAME = EXAMPLE_PERSON_NAME.encode()
DELIVERED = ("inbox",)  # the case system's folder: the only place a payload may be read


@pytest.fixture(scope="module")
def demo_run(rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The demo run twice in the same folder; the second run's output and folder."""
    amqp, management = rabbitmq_urls
    workdir = tmp_path_factory.mktemp("demo") / "demo-run"
    first = io.StringIO()
    run_demo(workdir, first, amqp_url=amqp, management_url=management)
    second = io.StringIO()
    run_demo(workdir, second, amqp_url=amqp, management_url=management)
    return second.getvalue(), workdir, management


def test_demo_prints_every_stage(demo_run) -> None:
    """Every stage of the return case is printed with who sent it to whom."""
    output, _, _ = demo_run
    for number, step in enumerate(STEPS, 1):
        line = next(x for x in output.splitlines() if x.startswith(f"[{number}/{len(STEPS)}]"))
        assert step.kind in line and step.sender in line and f"routing stage {step.stage}" in line
    assert "intact:" in output
    assert "no difference" in output


def test_demo_leaves_its_files(demo_run) -> None:
    """The directory, the audit export, the logs and a folder per participant are left."""
    _, workdir, _ = demo_run
    assert (workdir / "directory.json").is_file()
    assert (workdir / "audit.jsonl").is_file()
    logs = {p.name for p in (workdir / "logs").iterdir()}
    assert {"iom-kz.log", "iom-uz.log", f"{NGO}.log", "routing.log"} <= logs
    homes = {p.name for p in workdir.iterdir() if (p / "participant.json").is_file()}
    assert {"iom-kz", "iom-uz", NGO, "routing", "auditor"} <= homes


def test_export_verifies_with_the_demo_directory(demo_run) -> None:
    """The exported log passes `trm audit verify` with the directory the demo made."""
    from trm.cli import cli

    _, workdir, _ = demo_run
    result = CliRunner().invoke(
        cli,
        [
            "audit",
            "verify",
            str(workdir / "audit.jsonl"),
            "--directory",
            str(workdir / "directory.json"),
            "--authority-key",
            str(workdir / "authority" / "authority.pub"),
            "--json",
        ],
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output.strip().splitlines()[-1])
    assert report["intact"] is True
    assert report["entries"] >= len(STEPS)


def test_export_carries_both_witnesses_cosignatures(demo_run) -> None:
    """Both mission witnesses cosigned the newest checkpoint; verify prints the quorum met."""
    output, workdir, _ = demo_run
    assert any(x.startswith("[witnesses] checkpoint of size") for x in output.splitlines())
    assert (
        "quorum met: 2 witnesses cosigned the newest checkpoint (iom-kz, iom-uz), 2 required"
        in (output)
    )
    marks = [
        json.loads(line)
        for line in (workdir / "audit.jsonl").read_text().splitlines()
        if '"type":"checkpoint"' in line
    ]
    newest = marks[-1]["note"]
    for witness in ("iom-kz", "iom-uz"):
        assert f"\u2014 trm.witness/{witness}/" in newest


def test_referral_story_halts_erases_and_refuses(demo_run) -> None:
    """The referral is walked to its service; after the withdrawal each party prints its halt
    and erasure, no payload of the referral is left in any case folder, and a later send is
    refused with consent_withdrawn."""
    output, workdir, _ = demo_run
    lines = output.splitlines()
    for stage in ("referral_requested", "referral_accepted", "service_started", "halted"):
        assert any(x.startswith("[referral]") and f"routing stage {stage}" in x for x in lines)
    for party, erased in ((NGO_KZ, 2), (NGO, 1)):
        [line] = [x for x in lines if x.startswith(f"[referral] {party} ")]
        assert "case halted by" in line and f"{erased} delivered payload(s) erased" in line
    assert any("is refused: consent_withdrawn" in x for x in lines)
    for folder in workdir.glob("*/inbox"):
        for path in folder.glob("*.json"):
            document = json.loads(path.read_text())
            if document["case"] == REFERRAL_CASE:
                assert document["kind"] == "erasure_confirmed", path


def test_victim_name_only_in_delivered_payloads(demo_run) -> None:
    """The person's name is in the recipients' delivered payloads and nowhere else."""
    _, workdir, management = demo_run
    leaks, delivered = [], []
    for path in workdir.rglob("*"):
        if not path.is_file() or NAME not in path.read_bytes():
            continue
        (delivered if path.parent.name in DELIVERED else leaks).append(path)
    assert leaks == []
    readers = {p.parent.parent.name for p in delivered}
    assert readers == {UZ, NGO}  # the return request's recipients, nobody else
    client = ManagementClient(management)
    for queue in client.list_queues(DEMO_VHOST):
        for message in client.peek_messages(DEMO_VHOST, queue.name, queue.messages):
            assert NAME not in message


def test_demo_refuses_a_folder_it_did_not_make(tmp_path: Path) -> None:
    """A non-empty folder without the demo's marker is never wiped."""
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConfigError, match="not made by trm demo"):
        prepare_workdir(tmp_path)
    assert (tmp_path / "precious.txt").read_text() == "keep me"


def test_help_reference_mentions_demo() -> None:
    """The generated command reference documents `trm demo --workdir`."""
    assert "trm demo" in render() and "--workdir" in render()
