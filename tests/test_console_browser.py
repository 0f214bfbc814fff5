"""The console's pages in a real headless Chromium (Debian's), over the real RabbitMQ with
real adapter processes: an NGO case worker confirms a return's reception in two clicks and
the Kazakh mission's console shows the case received with the receipts; a Kazakh case worker
corrects a return request's field error and sends it; an auditor verifies an export.

With TRM_SCREENSHOTS=DIR set, the main pages are also written there as PNGs (the README's
come from ``TRM_SCREENSHOTS=docs/img``).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright

from broker.directory import Role
from console.accounts import Role as StaffRole
from schemas.base import MessageKind
from schemas.examples import EXAMPLE_PERSON_NAME, example, sharing_with
from trm.consoles import Login, ServedConsole, serve_console
from trm.localnet import LocalNetwork, create_network

pytestmark = [pytest.mark.rabbitmq, pytest.mark.slow]

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-dev-shm-usage",
]
KZ, UZ, NGO, ROUTING, AUDITOR = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod", "routing", "auditor"
PARTICIPANTS = (
    (KZ, Role.MISSION, "KZ", None),
    (UZ, Role.MISSION, "UZ", None),
    (NGO, Role.NGO, "UZ", UZ),
    (ROUTING, Role.ROUTING, "AT", None),
    (AUDITOR, Role.AUDITOR, "AT", None),
)
CASE = "iom-kz.KZ-2026-0501"
WAIT = 60.0
"""Only for a hung run: each condition normally holds within a second or two."""
UI_WAIT = 20_000
"""Milliseconds a page may take to show what is waited for."""
SHOTS = os.environ.get("TRM_SCREENSHOTS")
LAPTOP = {"width": 1100, "height": 760}
PHONE = {"width": 390, "height": 800}


@pytest.fixture(scope="module")
def net(
    rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNetwork]:
    """Both missions, the NGO and the routing service running; the auditor's home."""
    network = create_network(
        tmp_path_factory.mktemp("browser"),
        PARTICIPANTS,
        amqp_url=rabbitmq_urls[0],
        management_url=rabbitmq_urls[1],
    )
    try:
        for participant in (KZ, UZ, NGO):
            network.start_adapter(participant)
        network.start_process(["routing", "run", "--home", str(network.home(ROUTING))], ROUTING)
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module")
def consoles(net: LocalNetwork) -> Iterator[dict[str, ServedConsole]]:
    """A console per participant of the story, each with a case worker's account."""
    served: dict[str, ServedConsole] = {}
    try:
        for participant, language in ((KZ, "en"), (NGO, "en"), (AUDITOR, "en"), (ROUTING, "en")):
            served[participant] = serve_console(net.settings(participant))
            served[participant].add_login("worker", StaffRole.CASE_WORKER, language)
        yield served
    finally:
        for console in served.values():
            console.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    """Debian's headless Chromium driven by Playwright; never a browser of Playwright's own."""
    if not CHROMIUM.is_file():
        pytest.fail(
            f"{CHROMIUM} is missing: the console's browser tests need Debian's chromium "
            "(`scripts/ensure-services chromium`, or `sudo apt-get install -y chromium`)"
        )
    with sync_playwright() as playwright:
        launched = playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS, headless=True
        )
        try:
            yield launched
        finally:
            launched.close()


def signed_in(browser: Browser, console: ServedConsole, viewport: dict[str, int] = LAPTOP) -> Page:
    """A fresh browser context signed in to `console` as its case worker."""
    page = browser.new_context(viewport=viewport).new_page()
    login: Login = console.logins[0]
    page.goto(f"{console.url}/login")
    page.fill("#username", login.username)
    page.fill("#password", login.password)
    page.click("button[type=submit]")
    expect(page.locator("header .who")).to_contain_text(login.username, timeout=UI_WAIT)
    return page


def shot(page: Page, name: str) -> None:
    """Write the page's screenshot to TRM_SCREENSHOTS/NAME.png when that is set."""
    if SHOTS:
        Path(SHOTS).mkdir(parents=True, exist_ok=True)
        page.screenshot(path=str(Path(SHOTS) / f"{name}.png"))


def applied(net: LocalNetwork, participant: str, envelope_id: str) -> None:
    """Wait until `participant`'s adapter applied `envelope_id`."""
    net.wait_for(
        lambda: envelope_id in net.inbox_ids(participant),
        WAIT,
        f"{participant} to apply {envelope_id}",
    )


def departed_return(net: LocalNetwork) -> None:
    """The return of CASE walked up to the person's departure, each step applied by all."""
    steps = (
        (MessageKind.RETURN_REQUEST, KZ, (UZ, NGO)),
        (MessageKind.RETURN_ACCEPTED, UZ, (KZ, NGO)),
        (MessageKind.TRAVEL_ARRANGED, KZ, (UZ, NGO)),
        (MessageKind.DEPARTED, KZ, (UZ, NGO)),
    )
    for kind, sender, to in steps:
        sealed = net.send(sender, kind, to=to, case=CASE)
        for recipient in to:
            applied(net, recipient, str(sealed.id))


def test_ngo_confirms_reception_and_the_mission_sees_it_received(net, consoles, browser) -> None:
    """The NGO's case worker finds the return in the inbox, reads it decrypted, confirms
    reception in two clicks; iom-kz's console then shows the case received, the NGO's
    confirmation in its timeline and the NGO's receipt for its departure notice."""
    departed_return(net)
    page = signed_in(browser, consoles[NGO])
    group = page.locator(f'section[data-case="{CASE}"]')
    expect(group.locator(".badge.new").first).to_be_visible()
    shot(page, "inbox")
    group.locator("h2 a").click()
    request = page.locator('li[data-kind="return_request"]')
    expect(request).to_contain_text(EXAMPLE_PERSON_NAME)
    shot(page, "case")
    page.click('a[data-action="reception_confirmed"]')
    page.click("#confirm")
    expect(page.locator(".notice")).to_be_visible(timeout=UI_WAIT)
    confirmation = parse_qs(urlsplit(page.url).query)["sent"][0]
    expect(page.locator('li[data-kind="reception_confirmed"]')).to_have_count(1)
    assert page.locator('a[data-action="reception_confirmed"]').count() == 0

    applied(net, KZ, confirmation)
    mission = signed_in(browser, consoles[KZ])
    mission.goto(f"{consoles[KZ].url}/cases/{CASE}")
    expect(mission.locator('[data-stage="received"]')).to_be_visible()
    expect(mission.locator(f"#e-{confirmation}")).to_contain_text("ngo-uz-istiqbolli-avlod")
    departure = mission.locator('li[data-kind="departed"]')
    net.wait_for(
        lambda: _receipt_shown(mission, consoles[KZ], departure), WAIT, "the NGO's receipt"
    )
    phone = signed_in(browser, consoles[KZ], PHONE)
    phone.goto(f"{consoles[KZ].url}/cases/{CASE}")
    assert phone.evaluate("document.documentElement.scrollWidth <= window.innerWidth")


def _receipt_shown(page: Page, console: ServedConsole, departure) -> bool:
    page.goto(f"{console.url}/cases/{CASE}")
    return departure.locator(f'[data-receipt="{NGO}"]').count() == 1


def test_mission_corrects_a_field_error_then_sends_a_return_request(net, consoles, browser):
    """A return request form with a lowercase nationality shows the error at that field and
    queues nothing; corrected, previewed and sealed, it is applied by iom-uz."""
    page = signed_in(browser, consoles[KZ])
    page.goto(f"{consoles[KZ].url}/new/return_request")
    _fill_return_request(page, nationality="uz")
    before = net.outbox_pending(KZ), len(_outbox_ids(net))
    page.click('button[value="preview"]')
    field = page.locator('[data-field="person.nationality"]')
    expect(field.locator(".error")).to_be_visible(timeout=UI_WAIT)
    assert page.locator(".error").count() == 1
    assert (net.outbox_pending(KZ), len(_outbox_ids(net))) == before
    page.locator("#f-person").scroll_into_view_if_needed()
    shot(page, "form-error")

    page.fill("#f-person-nationality", "UZ")
    page.click('button[value="preview"]')
    expect(page.locator(".payload-preview")).to_contain_text("Returnee Browser")
    page.click('button[value="send"]')
    expect(page.locator(".notice")).to_be_visible(timeout=UI_WAIT)
    sent = parse_qs(urlsplit(page.url).query)["sent"][0]
    assert sent in _outbox_ids(net)
    applied(net, UZ, sent)


def _outbox_ids(net: LocalNetwork) -> set[str]:
    import sqlalchemy as sa

    from broker.database import outbox_table

    with net.engine(KZ).connect() as conn:
        return set(conn.execute(sa.select(outbox_table.c.envelope_id)).scalars())


def _fill_return_request(page: Page, *, nationality: str) -> None:
    page.fill("#f-_case", "KZ-2026-0502")
    for who in (UZ, NGO):
        page.check(f'[data-field="_to"] input[value="{who}"]')
        page.check(f'[data-field="consent.scope.share_with"] input[value="{who}"]')
    page.check("#f-consent-informed_and_voluntary")
    page.fill("#f-consent-given_at", "2026-05-01T10:00")
    page.fill("#f-consent-recorded_by-role", "case manager")
    page.fill("#f-consent-language", "ru")
    page.check('[data-field="consent.scope.data"] input[value="identity"]')
    for purpose in ("return_assistance", "reception"):
        page.check(f'[data-field="consent.scope.purposes"] input[value="{purpose}"]')
    page.fill("#f-person-full_name", "Returnee Browser")
    page.select_option("#f-person-sex", "female")
    page.fill("#f-person-nationality", nationality)
    page.select_option("#f-person-identity_document", "held_by_exploiter")
    page.fill("#f-destination_country", "KZ")
    page.fill("#f-origin_country", "UZ")
    page.select_option("#f-travel_documents", "held_by_exploiter")
    page.fill("#f-travel_window-earliest", "2026-06-01")
    page.fill("#f-travel_window-latest", "2026-06-30")


def test_auditor_uploads_an_export_and_sees_it_verified(net, consoles, browser, tmp_path):
    """The routing log exported as the demo exports it, with the checkpoint the auditor kept,
    verifies in the auditor's console, progress shown until intact; a case from it shows
    headers and no payload."""
    opened = sharing_with(example(MessageKind.RETURN_REQUEST), (KZ, UZ, NGO))
    sealed = net.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ], case=f"{KZ}.KZ-2026-0503",
                      message=opened)  # fmt: skip
    applied(net, UZ, str(sealed.id))
    export = tmp_path / "audit.jsonl"
    net.wait_for(lambda: _logged(net, str(sealed.id)), WAIT, "the routing service to log it")
    done = subprocess.run(
        [sys.executable, "-m", "trm", "audit", "export", "--home", str(net.home(ROUTING)),
         "--out", str(export)],
        env=net.environment(ROUTING), capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    from services.auditlog import AuditLog

    newest = AuditLog.reader(net.engine(ROUTING)).latest_checkpoint()
    assert newest is not None
    kept = tmp_path / "kept-checkpoint.txt"
    kept.write_bytes(newest[2])

    page = signed_in(browser, consoles[AUDITOR])
    page.set_input_files("#export", str(export))
    page.set_input_files("#checkpoint", str(kept))
    page.click("form[action='/audit/verify'] button[type=submit]")
    job = page.locator("#job")
    expect(job).to_have_attribute("data-state", "intact", timeout=UI_WAIT)
    expect(job.locator(".verdict-ok")).to_be_visible()
    expect(job).to_contain_text("kept-checkpoint.txt")
    shot(page, "audit-verified")
    job.locator(f'a:has-text("{KZ}.KZ-2026-0503")').click()
    row = page.locator(f'table.headers tr[data-envelope="{sealed.id}"]')
    expect(row).to_contain_text("Return request")
    assert EXAMPLE_PERSON_NAME not in page.content()


def _logged(net: LocalNetwork, envelope_id: str) -> bool:
    from services.casestore import CaseStore

    state = CaseStore(net.engine(ROUTING)).get(f"{KZ}.KZ-2026-0503")
    return state is not None and any(e.event.envelope_id == envelope_id for e in state.entries)


def test_routing_operator_sees_every_case_and_its_headers(consoles, browser) -> None:
    """The routing operator's start page lists every case the service tracks, each with its
    stage, and a case's page its headers only."""
    page = signed_in(browser, consoles[ROUTING])
    rows = page.locator("tr[data-case]")
    expect(rows.filter(has_text=CASE)).to_have_count(1)
    expect(rows.filter(has_text=CASE)).to_contain_text("received")
    rows.filter(has_text=CASE).locator("a").click()
    expect(page.locator("table.headers tr[data-envelope]").first).to_be_visible()
    assert EXAMPLE_PERSON_NAME not in page.content()


def test_login_page_in_russian(consoles, browser) -> None:
    """The sign-in page speaks Russian when asked, and signing in keeps the user's language."""
    page = browser.new_context(viewport=LAPTOP).new_page()
    page.goto(f"{consoles[NGO].url}/login?lang=ru")
    expect(page.locator("h1")).to_have_text("Вход")
    assert page.locator("html").get_attribute("lang") == "ru"
    shot(page, "login-ru")
