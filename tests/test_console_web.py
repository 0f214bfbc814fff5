"""The console's pages over HTTP (in process, on a provisioned network with no adapter):
both languages say everything, every kind gets a form from its schema that reads back the
kind's example exactly, errors land at their field, a preview queues nothing and sending
queues once, a consent withdrawal states its erasure first, and a read-only account sees no
action and is refused when it posts anyway, with nothing changed."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from broker.casepolicy import OPENING_KINDS, Stage
from broker.testing import DEFAULT_PARTICIPANTS
from console import forms
from console.accounts import Role, add_user
from console.app import create_app
from console.audits import JobState
from console.i18n import CATALOGUES, field_label, translate, value_label
from schemas.base import MessageKind
from schemas.examples import example
from schemas.registry import MESSAGE_TYPES
from tests.console_support import INLINE_SCRIPT, PASSWORD, counts, csrf_of, form, sign_in
from trm.localnet import LocalNetwork, create_network

KZ, UZ, NGO = "iom-kz", "iom-uz", "ngo-uz-istiqbolli-avlod"
CASE = "iom-kz.KZ-2026-0601"
WITHDRAWN = "iom-kz.KZ-2026-0602"
"""The case whose request the send test withdraws."""
HOST = "testserver"
TEMPLATES = Path(__file__).parent.parent / "console" / "templates"
KEY = re.compile(r"""\bt\(\s*'([a-z_.]+[a-z_])'""")
PAGES = [
    Path(__file__).parent.parent / "console" / f"{m}.py"
    for m in ("pages", "casepages", "auditpages", "web")
]
WEB_KEY = re.compile(r'(?:\bt\(|NavItem\([^,]+,\s*|_Action\([^,]+,[^,]+,\s*)"([a-z_]+\.[a-z_.]+)"')


# --- words -----------------------------------------------------------------------------


def test_both_catalogues_have_the_same_keys_and_placeholders() -> None:
    """English and Russian say the same things, each with the same placeholders."""
    english, russian = CATALOGUES["en"], CATALOGUES["ru"]
    assert set(english) == set(russian)
    for key, text in english.items():
        assert set(re.findall(r"{(\w+)}", text)) == set(re.findall(r"{(\w+)}", russian[key]))
        assert text != russian[key] or text.startswith("{"), key


def test_every_word_a_template_uses_is_in_the_catalogue() -> None:
    """Every fixed key in the templates, every kind, stage and staff role has its text."""
    used = {key for path in TEMPLATES.glob("*.html") for key in KEY.findall(path.read_text())}
    used |= {key for path in PAGES for key in WEB_KEY.findall(path.read_text())}
    used |= {f"kind.{k}" for k in MessageKind} | {f"stage.{s}" for s in Stage}
    used |= {f"role.{r}" for r in Role} | {f"audit.state.{s}" for s in JobState}
    used |= {"direction.sent", "direction.received"}
    used |= {f"nav.new.{k}" for k in OPENING_KINDS}
    for kind in MessageKind:
        for item in _items(forms.form_for(kind).children):
            key = next(p for p in reversed(item.name.split(".")) if not p.isdigit())
            used.add(f"label.{key}")
            if isinstance(item, forms.Field):
                used |= {f"value.{choice}" for choice in item.choices}
    assert len(used) > 300
    assert sorted(used - set(CATALOGUES["en"])) == []
    assert translate("ru", "inbox.unread", count=3) == "новых: 3"
    assert field_label("ru", "person.full_name") == "Полное имя"
    assert value_label("ru", "held_by_exploiter") == "у эксплуататора"
    assert value_label("ru", NGO) == NGO


# --- forms from the schemas ---------------------------------------------------------------


def values_of(document: dict[str, Any], prefix: str = "") -> dict[str, list[str]]:
    """What a person types into the generated form to say `document` (a payload's JSON)."""
    out: dict[str, list[str]] = {}
    for key, value in document.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out |= values_of(value, f"{name}.")
        elif isinstance(value, list) and value and isinstance(value[0], dict):
            for i, row in enumerate(value):
                out |= values_of(row, f"{name}.{i}.")
        elif isinstance(value, list):
            out[name] = [str(v) for v in value]
        elif isinstance(value, bool):
            out[name] = ["on"] if value else []
        elif value is not None:
            out[name] = [str(value)]
    return out


@pytest.mark.parametrize("kind", list(MessageKind))
def test_every_kind_has_a_form_that_reads_back_its_example(kind: MessageKind) -> None:
    """The form generated from each kind's schema, filled in with the kind's example,
    gives back exactly that example, through the decoder `trm send` uses."""
    model = MESSAGE_TYPES[kind]
    generated = forms.form_for(kind)
    assert generated.children and generated.title
    message = example(kind)
    values = values_of(message.model_dump(mode="json"))
    assert set(values) <= generated.names()
    checked = forms.check_payload(generated, values)
    assert checked.errors == {}
    assert checked.payload == model.model_validate_json(message.model_dump_json())


def test_form_fields_take_help_choices_and_widgets_from_the_schema() -> None:
    """Descriptions become help, enumerations choices, dates and lists their widgets."""
    generated = forms.form_for(MessageKind.RETURN_REQUEST, {"participants": [UZ, NGO]})
    fields = {f.name: f for f in _leaves(generated.children)}
    assert "country of exploitation" in fields["destination_country"].help
    assert fields["person.sex"].widget is forms.Widget.SELECT
    assert "held_by_exploiter" in fields["person.identity_document"].choices
    assert fields["consent.scope.share_with"].choices == (UZ, NGO)
    assert fields["transport_needs"].widget is forms.Widget.CHOICES
    assert fields["travel_window.earliest"].widget is forms.Widget.DATE
    assert fields["consent.given_at"].widget is forms.Widget.DATETIME
    assert fields["notes"].widget is forms.Widget.TEXTAREA
    assert fields["person.full_name"].required and not fields["person.date_of_birth"].required


def _items(items: Any) -> Iterator[forms.Field | forms.Group]:
    for item in items:
        yield item
        if isinstance(item, forms.Group):
            yield from _items(item.children)


def _leaves(items: Any) -> Iterator[forms.Field]:
    for item in items:
        if isinstance(item, forms.Field):
            yield item
        else:
            yield from _leaves(item.children)


def test_errors_are_placed_at_their_field_and_a_rule_across_fields_on_the_form() -> None:
    """A bad nationality is reported at that field only; two equal countries, which only the
    model's own rule refuses, on the form as a whole; a blank optional group is left out."""
    generated = forms.form_for(MessageKind.RETURN_REQUEST)
    values = values_of(example(MessageKind.RETURN_REQUEST).model_dump(mode="json"))
    values.pop("escort.stages"), values.pop("escort.note")
    bad = {**values, "person.nationality": ["uz"]}
    assert set(forms.check_payload(generated, bad).errors) == {"person.nationality"}
    same = {**values, "origin_country": ["KZ"]}
    assert list(forms.check_payload(generated, same).errors) == [forms.FORM_ERROR]
    assert forms.check_payload(generated, values).payload.escort is None  # type: ignore[union-attr]


# --- pages over HTTP ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net(
    rabbitmq_urls: tuple[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LocalNetwork]:
    """A provisioned network, no adapter: what iom-kz sends stays in its outbox."""
    network = create_network(
        tmp_path_factory.mktemp("console-web"),
        DEFAULT_PARTICIPANTS,
        amqp_url=rabbitmq_urls[0],
        management_url=rabbitmq_urls[1],
    )
    try:
        for case in (CASE, WITHDRAWN):
            network.send(KZ, MessageKind.RETURN_REQUEST, to=[UZ, NGO], case=case)
        yield network
    finally:
        network.close()


@pytest.fixture(scope="module")
def app(net: LocalNetwork) -> FastAPI:
    """iom-kz's console with a case worker (English) and a read-only account (Russian)."""
    console = create_app(net.settings(KZ), allowed_hosts=[HOST])
    engine = console.state.console.engine
    add_user(engine, "worker", PASSWORD, Role.CASE_WORKER)
    add_user(engine, "reader", PASSWORD, Role.READ_ONLY, "ru")
    return console


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    """A browser of the console, not signed in."""
    with TestClient(app, base_url=f"http://{HOST}") as browser:
        yield browser


def signed(client: TestClient, username: str) -> TestClient:
    """`client` signed in as `username`."""
    assert sign_in(client, username).status_code == 303
    return client


def test_pages_render_without_inline_script_in_the_users_language(client) -> None:
    """Each page of a mission's home answers 200 in English for the worker, with no inline
    script; the case page shows what iom-kz sent and only actions a worker may take."""
    signed(client, "worker")
    for path in ("/", f"/cases/{CASE}", "/outbox", "/quarantine", "/new/return_request", "/login"):
        page = client.get(path)
        assert page.status_code == 200, path
        assert not INLINE_SCRIPT.search(page.text), path
        assert '<html lang="en">' in page.text
    case = client.get(f"/cases/{CASE}").text
    assert 'data-stage="requested"' in case and "Return request" in case
    assert 'data-action="consent_withdrawn"' in case
    assert 'data-action="reception_confirmed"' not in case  # a mission never confirms it


def test_a_user_chooses_the_language_of_the_pages(client) -> None:
    """A Russian account reads Russian; switching to English sticks for that account."""
    signed(client, "reader")
    assert "Исходящие" in client.get("/outbox").text
    csrf = csrf_of(client)
    moved = client.post(
        "/language", data=form(csrf, language="en", next="/outbox"), follow_redirects=False
    )
    assert moved.status_code == 303 and moved.headers["location"] == "/outbox"
    assert "Outbox" in client.get("/outbox").text
    client.post("/language", data=form(csrf, language="ru", next="/"))
    assert "Входящие" in client.get("/").text


def test_preview_queues_nothing_and_send_queues_once(client, net, app) -> None:
    """A message previewed is only shown; sent from the preview it is queued once, named
    in the case page's notice, and the trail records who sent it."""
    signed(client, "worker")
    path = f"/cases/{WITHDRAWN}/send/request_withdrawn"
    assert client.get(path).status_code == 200
    fields = form(csrf_of(client), reason="person_changed_plans", _to=UZ)
    engine = app.state.console.engine
    before = counts(engine)
    preview = client.post(path, data={**fields, "step": "preview"})
    assert preview.status_code == 200 and "Seal and send" in preview.text
    assert counts(engine) == before
    sent = client.post(path, data={**fields, "step": "send"}, follow_redirects=False)
    assert sent.status_code == 303
    envelope = sent.headers["location"].split("sent=")[1].split("&")[0]
    assert counts(engine)["outbox"] == before["outbox"] + 1
    assert envelope in client.get(sent.headers["location"]).text
    assert client.post(path, data={**fields, "step": "send"}).status_code == 403  # withdrawn
    assert counts(engine)["outbox"] == before["outbox"] + 1


def test_a_schema_error_is_shown_at_its_field_and_queues_nothing(client, app) -> None:
    """An unknown reason comes back 422 with the error at that field; nothing is queued."""
    signed(client, "worker")
    engine = app.state.console.engine
    before = counts(engine)
    answer = client.post(
        f"/cases/{CASE}/send/request_withdrawn",
        data=form(csrf_of(client), reason="", _to=UZ, step="preview"),
    )
    assert answer.status_code == 422
    assert 'data-error-for="reason"' in answer.text
    assert counts(engine) == before


def test_withdrawal_states_the_erasure_before_it_is_sent(client) -> None:
    """The withdrawal page says the case halts at every party and what deletion erases."""
    signed(client, "worker")
    page = client.get(f"/cases/{CASE}/withdraw").text
    assert "halts at every party" in page
    assert f"{NGO}, {UZ}" in page or f"{UZ}, {NGO}" in page
    assert "erase theirs and confirm" in page


def test_read_only_sees_no_action_and_is_refused_when_posting(client, app) -> None:
    """A read-only account's case page offers no action; its crafted posts (send, withdraw,
    a new case) are refused with 403 and no row changes anywhere."""
    signed(client, "reader")
    case = client.get(f"/cases/{CASE}").text
    assert 'data-stage="requested"' in case and "data-action=" not in case
    engine = app.state.console.engine
    before = counts(engine)
    csrf = csrf_of(client)
    for path, fields in (
        (
            f"/cases/{CASE}/send/request_withdrawn",
            {"reason": "duplicate", "_to": UZ, "step": "send"},
        ),
        (f"/cases/{CASE}/withdraw", {"delete_data": "on"}),
        ("/new/return_request", {"step": "send"}),
    ):
        refused = client.post(path, data=form(csrf, **fields), follow_redirects=False)
        assert refused.status_code == 403, path
    assert client.get(f"/cases/{CASE}/withdraw").status_code == 403
    assert counts(engine) == before


def test_a_form_post_without_the_csrf_token_is_refused(client, app) -> None:
    """The case worker's own form, posted without its CSRF token, is refused; nothing queued."""
    signed(client, "worker")
    engine = app.state.console.engine
    before = counts(engine)
    refused = client.post(
        f"/cases/{CASE}/send/request_withdrawn",
        data={"reason": "duplicate", "_to": UZ, "step": "send"},
    )
    assert refused.status_code == 403
    assert json.loads(refused.text)["detail"]["reason"] == "csrf"
    assert counts(engine) == before


def test_an_upload_that_is_no_export_fails_with_its_reason(network, tmp_path) -> None:
    """A file that is not an audit export ends its verification as failed, saying why,
    never as intact; the console keeps the upload only in its own folder."""
    import io
    import threading

    from console.audits import AuditJobs, JobState

    jobs = AuditJobs(tmp_path / "uploads")
    job = jobs.start("notes.txt", io.BytesIO(b"this is not an export\n"), network.directory)
    pause = threading.Event()
    for _ in range(600):
        if job.state is not JobState.RUNNING:
            break
        pause.wait(0.05)
    assert job.state in (JobState.FAILED, JobState.TAMPERED)
    assert job.problem and job.report is None and job.cases == {}
    assert [p.parent for p in (tmp_path / "uploads").iterdir()] == [tmp_path / "uploads"]
    assert jobs.all() == [job]
