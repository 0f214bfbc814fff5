"""`trm demo`: the three stories end to end, twice in a row, leaking nothing; the second
time with --console, whose consoles sign their printed logins in until Ctrl-C."""

from __future__ import annotations

import io
import json
import os
import re
import signal
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from pathlib import Path
from queue import Queue
from typing import Any
from urllib.parse import urlencode

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
from trm.democonsoles import CONSOLES
from trm.reference import render

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

NAME = EXAMPLE_PERSON_NAME.encode()
DELIVERED = ("inbox",)  # the case system's folder: the only place a payload may be read


@pytest.fixture(scope="module")
def demo_run(rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory):
    """The demo run twice in the same folder, the second time as `trm demo --console` whose
    consoles are signed in to (see `consoles_run`) before Ctrl-C; its output and folder."""
    amqp, management = rabbitmq_urls
    workdir = tmp_path_factory.mktemp("demo") / "demo-run"
    first = io.StringIO()
    run_demo(workdir, first, amqp_url=amqp, management_url=management)
    second = consoles_run(workdir, amqp, management)
    return second, workdir, management


def consoles_run(workdir: Path, amqp: str, management: str) -> str:
    """`trm demo --console` in a process: once its consoles run, each printed login must
    sign in over HTTP (a wrong password must not), then SIGINT must end it with exit 0."""
    env = {**os.environ, "TRM_AMQP_URL": amqp, "TRM_AMQP_MANAGEMENT_URL": management}
    with (workdir.parent / "stderr.log").open("w") as errors:
        proc = subprocess.Popen(
            [sys.executable, "-m", "trm", "demo", "--workdir", str(workdir), "--console"],
            stdout=subprocess.PIPE,
            stderr=errors,
            stdin=subprocess.DEVNULL,
            text=True,
            env=env,
        )
    lines: Queue[str | None] = Queue()
    threading.Thread(target=_pump, args=(proc, lines), daemon=True).start()
    try:
        printed = _until_ready(lines)
        logins = {m.group(1): m.groups()[1:] for m in map(CONSOLE_LINE.match, printed) if m}
        assert set(logins) == {participant for participant, _ in CONSOLES}, printed[-12:]
        for participant, (url, username, password) in logins.items():
            status, cookie = _sign_in(url, username, password)
            assert status == 303 and cookie.startswith("trm_session="), participant
            assert f"{username} <span" in _start_page(url, cookie), participant
            assert _sign_in(url, username, password + "x")[1] == "", participant
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=WAIT) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    rest = []
    while (line := lines.get(timeout=WAIT)) is not None:
        rest.append(line)
    assert any(x.startswith("[console] consoles and") for x in rest), rest
    return "\n".join(printed + rest) + "\n"


READY = "[console] running until Ctrl-C"
CONSOLE_LINE = re.compile(
    r"^\[console\] (\S+)\s+(http://127\.0\.0\.1:\d+)/\s+user (\S+)\s+password (\S+)$"
)
WAIT = 300.0
"""Only for a hung run: the story and its consoles take well under a minute."""


def _pump(proc: subprocess.Popen[str], lines: Queue[str | None]) -> None:
    """Each line the demo prints into `lines`, then None at its end."""
    assert proc.stdout is not None
    for line in proc.stdout:
        lines.put(line.rstrip("\n"))
    lines.put(None)


def _until_ready(lines: Queue[str | None]) -> list[str]:
    """The lines printed up to the consoles' ready line."""
    seen: list[str] = []
    while (line := lines.get(timeout=WAIT)) is not None:
        seen.append(line)
        if line == READY:
            return seen
    raise AssertionError(f"the demo ended before serving its consoles: {seen[-12:]}")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


def _sign_in(url: str, username: str, password: str) -> tuple[int, str]:
    """Fetch and post the sign-in form as a browser does; (status, session cookie)."""
    with urllib.request.urlopen(f"{url}/login", timeout=30) as page:  # noqa: S310
        form_cookie = page.headers.get("set-cookie", "").split(";", 1)[0]
        found = re.search(r'name="csrf_token" value="([^"]+)"', page.read().decode())
    assert found is not None, "the sign-in form carries no token"
    fields = {"username": username, "password": password, "next": "/", "csrf_token": found[1]}
    request = urllib.request.Request(  # noqa: S310 - the loopback address the demo printed
        f"{url}/auth/login",
        data=urlencode(fields).encode(),
        method="POST",
        headers={"Origin": url, "Cookie": form_cookie},
    )
    try:
        urllib.request.build_opener(_NoRedirect).open(request, timeout=30)
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("set-cookie", "").split(";", 1)[0]
    return 200, ""


def _start_page(url: str, cookie: str) -> str:
    request = urllib.request.Request(f"{url}/", headers={"Cookie": cookie})  # noqa: S310
    with urllib.request.urlopen(request, timeout=30) as answer:  # noqa: S310
        return str(answer.read().decode())


def test_demo_prints_every_stage(demo_run) -> None:
    """Every stage of the return case is printed with who sent it to whom."""
    output, _, _ = demo_run
    for number, step in enumerate(STEPS, 1):
        line = next(x for x in output.splitlines() if x.startswith(f"[{number}/{len(STEPS)}]"))
        assert step.kind in line and step.sender in line and f"routing stage {step.stage}" in line
    assert "intact:" in output
    assert "no difference" in output


def test_console_prints_an_address_and_login_for_each_console(demo_run) -> None:
    """--console printed an address and a login for both missions, the NGO and the auditor
    (each signed in, in `consoles_run`), and stopped cleanly on Ctrl-C."""
    output, _, _ = demo_run
    found = {m.group(1) for m in map(CONSOLE_LINE.match, output.splitlines()) if m}
    assert found == {participant for participant, _ in CONSOLES}
    assert any(x.startswith("[console] consoles and") for x in output.splitlines())


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
