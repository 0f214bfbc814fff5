"""Progress on a terminal (`trm.progress`): drawn on a TTY's stderr, never when piped."""

from __future__ import annotations

import io
import os
import select
import subprocess
import sys

import pytest
from test_auditlog import ROUTING, append_all, make_world

from broker.database import open_database
from trm.progress import Meter, duration


class Terminal(io.StringIO):
    """A text stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_meter_draws_done_rate_and_time_left_on_a_terminal() -> None:
    """The line says done of total, the rate so far and the time left at that rate."""
    clock, out = Clock(), Terminal()
    meter = Meter("verify", 1000, stream=out, clock=clock)
    clock.now += 10
    meter.update(250)
    assert out.getvalue() == "\rverify: 250 of 1,000 entries (25 %), 25 entries/s, 30 s left"


def test_meter_redraws_at_most_every_interval_and_ends_the_line() -> None:
    """Updates within the interval draw nothing more; finish draws the totals and a newline."""
    clock, out = Clock(), Terminal()
    meter = Meter("export", 100, stream=out, clock=clock, every=0.5)
    meter.update(10)
    clock.now += 0.1
    meter.update(20)
    assert out.getvalue().count("\r") == 1
    clock.now += 0.5
    meter.update(60)
    assert out.getvalue().count("\r") == 2
    clock.now += 1.4
    meter.update(100)
    meter.finish()
    text = out.getvalue()
    assert text.startswith("\rexport: 10 of 100 entries (10 %)\r")
    assert text.endswith("\rexport: 100 of 100 entries (100 %), 50 entries/s, 2 s taken\n")
    meter.update(100)
    assert out.getvalue() == text


def test_meter_in_bytes_shows_megabytes() -> None:
    """A count in bytes is shown in megabytes."""
    clock, out = Clock(), Terminal()
    meter = Meter("replay", unit="bytes", stream=out, clock=clock)
    clock.now += 2
    meter.update(3_000_000, 12_000_000)
    assert "replay: 3.0 of 12.0 MB (25 %), 1.5 MB/s, 6 s left" in out.getvalue()


def test_meter_is_silent_on_a_stream_that_is_no_terminal() -> None:
    """Piped or redirected, the meter writes nothing at all."""
    out = io.StringIO()
    with Meter("verify", 10, stream=out) as meter:
        meter.update(5)
        meter.advance(5)
    assert out.getvalue() == ""
    assert meter.done == 10


def test_duration_reads_as_seconds_minutes_or_hours() -> None:
    """Short times in seconds, longer ones in minutes, then hours."""
    assert [duration(s) for s in (4.4, 65, 7620)] == ["4 s", "1 min 05 s", "2 h 07 min"]


# --- the commands, under a pseudo-terminal and through a pipe ----------------------------------


@pytest.fixture(scope="module")
def commands(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[str]]:
    """`trm audit export`, `verify` and `replay` of a log holding one case's story."""
    world = make_world(tmp_path_factory.mktemp("progress-world"))
    url = f"sqlite:///{world.root / 'routing.db'}"
    engine = open_database(url)
    try:
        append_all(world.log(engine), [(raw, at, "ok") for raw, at in world.seal_story()])
    finally:
        engine.dispose()
    key = ["--authority-key", str(world.root / "authority" / "authority.pub")]
    directory = ["--directory", str(world.root / "directory.json")]
    export = world.root / "audit.jsonl"
    home = ["--home", str(world.root / ROUTING), "--database-url", url]
    assert _run(["audit", "export", *home, "--out", str(export)], tty=False)[0] == 0
    return {
        "export": ["audit", "export", *home, "--out", str(world.root / "again.jsonl")],
        "verify": ["audit", "verify", str(export), *directory, *key, "--workers", "1"],
        "replay": ["audit", "replay", str(export), *key],
    }


def _run(args: list[str], *, tty: bool) -> tuple[int, str, str]:
    """Exit code, stdout and stderr of ``trm ARGS``, stderr on a pseudo-terminal if `tty`."""
    command = [sys.executable, "-m", "trm", *args]
    if not tty:
        done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
        return done.returncode, done.stdout, done.stderr
    primary, secondary = os.openpty()
    try:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=secondary)
        os.close(secondary)
        stdout, _ = process.communicate(timeout=120)
        chunks = []
        while select.select([primary], [], [], 0)[0]:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # the other end closed: everything was read
                break
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(primary)
    return process.returncode, stdout.decode(), b"".join(chunks).decode()


@pytest.mark.parametrize("command", ["export", "verify", "replay"])
def test_audit_commands_show_progress_on_a_terminal_only(
    commands: dict[str, list[str]], command: str
) -> None:
    """On a TTY stderr gets the totals line; piped, stderr has none and stdout is the same."""
    args = {command: commands[command]}
    code, out_tty, err_tty = _run(args[command], tty=True)
    assert code == 0, err_tty
    unit = "entries" if command == "export" else "MB"
    assert f"{command}: " in err_tty and f"{unit} (100 %)" in err_tty, err_tty
    assert "/s, " in err_tty and " taken" in err_tty
    code, out_pipe, err_pipe = _run(args[command], tty=False)
    assert code == 0, err_pipe
    assert f"{command}: " not in err_pipe and "\r" not in err_pipe
    assert out_pipe == out_tty


def test_echo_prints_a_line_above_the_meter_or_plainly_when_piped() -> None:
    """On a terminal a line printed mid-work clears the meter, which is drawn again below it."""
    clock, out = Clock(), Terminal()
    meter = Meter("campaigns", 4, unit="runs", stream=out, clock=clock)
    meter.update(1)
    meter.echo("hostile [sqlite]: PASS")
    drawn, printed, again = out.getvalue().split("\r")[1:]
    assert drawn == "campaigns: 1 of 4 runs (25 %)"
    assert printed == f"{'hostile [sqlite]: PASS':<{len(drawn)}}\n"
    assert again == drawn
    piped = io.StringIO()
    Meter("campaigns", 4, stream=piped).echo("hostile [sqlite]: PASS")
    assert piped.getvalue() == "hostile [sqlite]: PASS\n"
