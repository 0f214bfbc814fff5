"""Provisioning the broker: names, permissions, idempotence, password files, the CLI."""

from __future__ import annotations

import base64
import json
import re
import stat
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from click.testing import CliRunner

from broker import _crypto
from broker.directory import DirectoryBody, KeyUse, Participant, PublicKey, Role, sign_directory
from broker.errors import ConfigError, LoginRefused, ProvisioningError, UserInUse
from broker.keys import init_authority, load_authority
from broker.management import ManagementClient
from broker.topology import (
    DELIVERY_LIMIT,
    EXCHANGE,
    QUARANTINE_EXCHANGE,
    ROUTING_QUEUE,
    inbox_queue,
    permissions_for,
    proofs_queue,
    provision,
    quarantine_queue,
    witness_queue,
)
from broker.transport import AmqpSettings, open_connection
from trm.cli import cli

T0 = datetime(2026, 1, 1, tzinfo=UTC)


# --- permissions (no broker needed) ------------------------------------------------


def test_permissions_grant_own_queues_only() -> None:
    """A mission reads only its own inbox and quarantine, writes only the two exchanges."""
    allowed = permissions_for("iom-kz", "mission")
    assert allowed.configure == "^$"
    for name in ("trm.inbox.iom-kz", "trm.quarantine.iom-kz"):
        assert re.search(allowed.read, name)
    for name in ("trm.inbox.iom-uz", "trm.inbox.iom-kzx", "trm.routing", "trm.inbox.iom-kz.x"):
        assert not re.search(allowed.read, name)
    for name in (EXCHANGE, QUARANTINE_EXCHANGE):
        assert re.search(allowed.write, name)
    for name in ("amq.default", "trm.inbox.iom-uz", "trm.handoffs", "amq.topic"):
        assert not re.search(allowed.write, name)


def test_routing_participant_also_reads_routing_queue() -> None:
    """The routing participant may read trm.routing besides its own queues; others may not."""
    assert re.search(permissions_for("routing", Role.ROUTING).read, ROUTING_QUEUE)
    assert re.search(permissions_for("routing", "routing").read, "trm.inbox.routing")
    assert not re.search(permissions_for("auditor-vienna", "auditor").read, ROUTING_QUEUE)


@pytest.mark.rabbitmq
def test_bad_participant_id_refused(rabbitmq_urls: tuple[str, str], vhost: str) -> None:
    """An id that could widen a permission regex is refused before anything is created."""
    management = ManagementClient(rabbitmq_urls[1])
    with pytest.raises(ConfigError, match="not a valid id"):
        provision(management, rabbitmq_urls[0], vhost, [(".*", "mission")], passwords={".*": "x"})
    assert management.get_user(".*") is None


# --- provisioning against RabbitMQ ----------------------------------------------------


def _ids() -> tuple[str, str, str]:
    suffix = uuid.uuid4().hex[:8]
    return f"kz-{suffix}", f"uz-{suffix}", f"routing-{suffix}"


@pytest.mark.rabbitmq
def test_provision_is_idempotent(
    rabbitmq_urls: tuple[str, str], vhost: str, tmp_path: Path
) -> None:
    """Provisioning twice creates users, quorum queues and 0600 password files once."""
    amqp_url, management_url = rabbitmq_urls
    management = ManagementClient(management_url)
    a, b, routing = _ids()
    participants = [(a, "mission"), (b, "ngo"), (routing, "routing")]
    first = provision(management, amqp_url, vhost, participants, keys_root=tmp_path)
    passwords = {p: (tmp_path / p / "amqp-password").read_text().strip() for p, _ in participants}
    second = provision(management, amqp_url, vhost, participants, keys_root=tmp_path)

    assert sorted(first.users_created) == sorted([a, b, routing])
    assert first.passwords_written == [tmp_path / p / "amqp-password" for p, _ in participants]
    assert second.users_created == [] and second.passwords_written == []
    assert second.queues == first.queues
    for path in first.passwords_written:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        assert path.read_text().strip() == passwords[path.parent.name]

    queues = {q.name: q for q in management.list_queues(vhost)}
    expected = {inbox_queue(p) for p, _ in participants} | {ROUTING_QUEUE}
    expected |= {quarantine_queue(p) for p, _ in participants}
    expected |= {witness_queue(p) for p, _ in participants}
    expected |= {proofs_queue(p) for p, _ in participants}
    assert set(queues) == expected
    assert {q.type for q in queues.values()} == {"quorum"}
    inbox = queues[inbox_queue(a)].arguments
    assert inbox["x-delivery-limit"] == DELIVERY_LIMIT
    assert inbox["x-dead-letter-exchange"] == QUARANTINE_EXCHANGE
    assert inbox["x-dead-letter-routing-key"] == a
    assert queues[ROUTING_QUEUE].arguments["x-dead-letter-routing-key"] == routing

    assert management.get_permissions(vhost, a) == {
        "configure": "^$",
        "write": r"^trm\.(handoff|quarantine|witness)$",
        "read": rf"^trm\.(inbox|quarantine|witness|proofs)\.{re.escape(a)}$",
    }
    routing_read = (management.get_permissions(vhost, routing) or {})["read"]
    assert re.search(routing_read, ROUTING_QUEUE)
    for participant_id, password in passwords.items():
        settings = AmqpSettings.from_url(
            amqp_url, vhost=vhost, username=participant_id, password=password
        )
        open_connection(settings).close()


@pytest.mark.rabbitmq
def test_given_password_used_and_not_written(
    rabbitmq_urls: tuple[str, str], vhost: str, tmp_path: Path
) -> None:
    """A password given for a participant is the one RabbitMQ accepts, and no file is written."""
    amqp_url, management_url = rabbitmq_urls
    a, _, _ = _ids()
    result = provision(
        ManagementClient(management_url),
        amqp_url,
        vhost,
        [(a, "mission")],
        keys_root=tmp_path,
        passwords={a: "given-secret"},
    )
    assert result.passwords_written == []
    assert not (tmp_path / a).exists()
    settings = AmqpSettings.from_url(amqp_url, vhost=vhost, username=a, password="given-secret")
    open_connection(settings).close()


@pytest.mark.rabbitmq
def test_new_user_without_password_source_refused(
    rabbitmq_urls: tuple[str, str], vhost: str
) -> None:
    """A new participant with neither --password nor --keys-root is refused, user not created."""
    management = ManagementClient(rabbitmq_urls[1])
    a, _, _ = _ids()
    with pytest.raises(ConfigError, match="--keys-root"):
        provision(management, rabbitmq_urls[0], vhost, [(a, "mission")])
    assert management.get_user(a) is None


@pytest.mark.rabbitmq
def test_conflicting_queue_arguments_refused(rabbitmq_urls: tuple[str, str], vhost: str) -> None:
    """Re-provisioning with another delivery limit fails clearly and keeps the queue's messages."""
    management = ManagementClient(rabbitmq_urls[1])
    a, _, _ = _ids()
    provision(management, rabbitmq_urls[0], vhost, [(a, "mission")], passwords={a: "x"})
    with pytest.raises(ProvisioningError, match="other arguments"):
        provision(
            management,
            rabbitmq_urls[0],
            vhost,
            [(a, "mission")],
            passwords={a: "x"},
            delivery_limit=5,
        )
    queue = management.get_queue(vhost, inbox_queue(a))
    assert queue is not None
    assert queue["arguments"]["x-delivery-limit"] == DELIVERY_LIMIT


# --- users shared between vhosts -------------------------------------------------------


@pytest.fixture
def other_vhost(rabbitmq_urls: tuple[str, str]) -> Iterator[str]:
    """A second fresh vhost, for another network on the same broker; deleted afterwards."""
    client = ManagementClient(rabbitmq_urls[1])
    name = f"trm-test-{uuid.uuid4().hex[:12]}"
    try:
        yield name
    finally:
        users = client.vhost_users(name)
        client.delete_vhost(name)
        for user in users:
            if user != client.username:
                client.delete_user_if_unused(user)


def _logs_in(amqp_url: str, vhost: str, user: str, password: str) -> bool:
    settings = AmqpSettings.from_url(amqp_url, vhost=vhost, username=user, password=password)
    try:
        open_connection(settings).close()
    except LoginRefused:
        return False
    return True


@pytest.mark.rabbitmq
def test_another_network_cannot_change_a_shared_users_password(
    rabbitmq_urls: tuple[str, str], vhost: str, other_vhost: str
) -> None:
    """A network whose id is another vhost's user and whose password differs is refused with
    that vhost named, before anything is created; the first network keeps its login."""
    amqp_url, management_url = rabbitmq_urls
    management = ManagementClient(management_url)
    shared, fresh = f"routing-{uuid.uuid4().hex[:8]}", f"auditor-{uuid.uuid4().hex[:8]}"
    provision(management, amqp_url, vhost, [(shared, "routing")], passwords={shared: "first"})
    with pytest.raises(UserInUse, match=rf"vhost '{vhost}'") as caught:
        provision(
            management,
            amqp_url,
            other_vhost,
            [(fresh, "auditor"), (shared, "routing")],
            passwords={fresh: "x", shared: "second"},
        )
    assert (caught.value.user, caught.value.vhosts) == (shared, (vhost,))
    assert "second" not in str(caught.value)
    assert _logs_in(amqp_url, vhost, shared, "first")
    assert management.get_user(fresh) is None
    assert not management.vhost_exists(other_vhost)


@pytest.mark.rabbitmq
def test_another_network_with_the_same_password_shares_the_user_untouched(
    rabbitmq_urls: tuple[str, str], vhost: str, other_vhost: str
) -> None:
    """A second network giving a shared user the password it has gets permissions on its own
    vhost and leaves the user itself as it was (as trm.localnet's derived passwords rely on)."""
    amqp_url, management_url = rabbitmq_urls
    management = ManagementClient(management_url)
    shared = f"routing-{uuid.uuid4().hex[:8]}"
    provision(management, amqp_url, vhost, [(shared, "routing")], passwords={shared: "same"})
    before = management.get_user(shared)
    second = provision(
        management, amqp_url, other_vhost, [(shared, "routing")], passwords={shared: "same"}
    )
    assert second.users_created == []
    # RabbitMQ salts every password it is given anew: an equal hash means no change.
    assert management.get_user(shared) == before
    assert management.user_vhosts(shared) == sorted([vhost, other_vhost])
    assert _logs_in(amqp_url, other_vhost, shared, "same")


@pytest.mark.rabbitmq
def test_no_password_rotation_for_a_user_another_vhost_uses(
    rabbitmq_urls: tuple[str, str], vhost: str, other_vhost: str, tmp_path: Path
) -> None:
    """A new password file is not made for a user another vhost uses: refused, no file left."""
    amqp_url, management_url = rabbitmq_urls
    management = ManagementClient(management_url)
    shared = f"kz-{uuid.uuid4().hex[:8]}"
    provision(management, amqp_url, vhost, [(shared, "mission")], passwords={shared: "first"})
    with pytest.raises(UserInUse, match="--password"):
        provision(management, amqp_url, other_vhost, [(shared, "mission")], keys_root=tmp_path)
    assert not (tmp_path / shared / "amqp-password").exists()
    assert _logs_in(amqp_url, vhost, shared, "first")


# --- the command line ------------------------------------------------------------------


def _public_key(kid: str, use: KeyUse) -> PublicKey:
    if use is KeyUse.SIGN:
        raw, alg = _crypto.raw_public(_crypto.new_signing_key().public_key()), "ed25519"
    else:
        suite = _crypto.Suite.X25519
        raw, alg = _crypto.new_decryption_key(suite).public().raw, str(suite)
    return PublicKey(
        kid=kid,
        use=use,
        alg=alg,
        public=base64.b64encode(raw).decode(),
        not_before=T0,
        not_after=T0 + timedelta(days=3650),
    )


def _signed_directory(tmp_path: Path, roles: dict[str, Role]) -> tuple[Path, Path]:
    authority = tmp_path / "authority"
    init_authority(authority)
    participants = tuple(
        Participant(
            id=pid,
            role=role,
            country="UZ",
            keys=(_public_key(f"{pid}-s", KeyUse.SIGN), _public_key(f"{pid}-e", KeyUse.ENCRYPT)),
        )
        for pid, role in roles.items()
    )
    body = DirectoryBody(serial=1, issued_at=T0, participants=participants)
    directory = tmp_path / "directory.json"
    directory.write_bytes(sign_directory(body, load_authority(authority)))
    return directory, authority / "authority.pub"


@pytest.mark.rabbitmq
def test_cli_provision_and_status(
    rabbitmq_urls: tuple[str, str], vhost: str, tmp_path: Path
) -> None:
    """trm broker provision reads the signed directory; trm broker status lists every queue."""
    amqp_url, management_url = rabbitmq_urls
    a, b, routing = _ids()
    directory, authority = _signed_directory(
        tmp_path, {a: Role.MISSION, b: Role.MISSION, routing: Role.ROUTING}
    )
    common = ["--vhost", vhost, "--management-url", management_url]
    args = ["broker", "provision", "--directory", str(directory), "--authority-key", str(authority)]
    args += [*common, "--amqp-url", amqp_url, "--keys-root", str(tmp_path / "homes"), "--json"]
    runner = CliRunner()
    result = runner.invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    summary = json.loads(result.stdout)
    assert sorted(summary["users_created"]) == sorted([a, b, routing])
    assert len(summary["passwords_written"]) == 3
    for path in summary["passwords_written"]:
        assert Path(path).read_text().strip() not in result.output

    status = runner.invoke(cli, ["broker", "status", *common, "--json"], catch_exceptions=False)
    assert status.exit_code == 0, status.output
    names = {row["queue"] for row in json.loads(status.stdout)["queues"]}
    assert {inbox_queue(a), inbox_queue(b), ROUTING_QUEUE, quarantine_queue(routing)} <= names


def test_cli_password_option_needs_id_and_secret(tmp_path: Path) -> None:
    """A --password without ID=SECRET is a usage error naming the option."""
    directory, authority = _signed_directory(tmp_path, {"iom-kz": Role.MISSION})
    args = ["broker", "provision", "--directory", str(directory), "--authority-key"]
    args += [str(authority), "--password", "iom-kz"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "--password" in result.output


@pytest.mark.rabbitmq
def test_cli_provision_reads_secrets_from_files(
    rabbitmq_urls: tuple[str, str], vhost: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Passwords and admin URLs can come from files (Docker secrets), not the command line."""
    amqp_url, management_url = rabbitmq_urls
    (a,) = _ids()[:1]
    directory, authority = _signed_directory(tmp_path, {a: Role.MISSION})
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "amqp_url").write_text(amqp_url + "\n")
    (secrets / "management_url").write_text(management_url + "\n")
    (secrets / "password").write_text("file-secret-123\n")
    monkeypatch.setenv("TRM_AMQP_URL_FILE", str(secrets / "amqp_url"))
    monkeypatch.setenv("TRM_AMQP_MANAGEMENT_URL_FILE", str(secrets / "management_url"))
    args = ["broker", "provision", "--directory", str(directory), "--authority-key", str(authority)]
    args += ["--vhost", vhost, "--password-file", f"{a}={secrets / 'password'}", "--json"]
    result = CliRunner().invoke(cli, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["users_created"] == [a]
    assert "file-secret-123" not in result.output
    settings = AmqpSettings.from_url(amqp_url, vhost=vhost, username=a, password="file-secret-123")
    open_connection(settings).close()  # the password from the file logs in


def test_cli_password_file_must_exist(tmp_path: Path) -> None:
    """A --password-file naming a missing file is a usage error naming the option."""
    directory, authority = _signed_directory(tmp_path, {"iom-kz": Role.MISSION})
    args = ["broker", "provision", "--directory", str(directory), "--authority-key"]
    args += [str(authority), "--password-file", f"iom-kz={tmp_path / 'missing'}"]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code != 0
    assert "--password-file" in result.output


@pytest.mark.rabbitmq
def test_a_provisioned_home_knows_its_vhost(
    rabbitmq_urls: tuple[str, str], vhost: str, tmp_path: Path
) -> None:
    """Provisioning with --keys-root records the vhost in each home; a home resolved with no
    --vhost and no TRM_AMQP_VHOST then logs in there; a flag still wins."""
    from adapters.home import Home
    from broker.transport import AmqpSettings, Publisher

    amqp_url, management_url = rabbitmq_urls
    a, _, _ = _ids()
    provision(
        ManagementClient(management_url), amqp_url, vhost, [(a, "mission")], keys_root=tmp_path
    )
    home = Home.resolve(tmp_path / a, amqp_url=amqp_url, environ={})
    assert home.vhost == vhost
    password = (tmp_path / a / "amqp-password").read_text().strip()
    login = AmqpSettings.from_url(amqp_url, vhost=home.vhost, username=a, password=password)
    Publisher(login, a).close()  # the recorded vhost is one the user may use
    assert Home.resolve(tmp_path / a, vhost="other", environ={}).vhost == "other"
