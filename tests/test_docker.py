"""The deployable stack in docker/ stays valid, and its broker setup provisions."""

from __future__ import annotations

import json
import secrets
import shlex
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from click.testing import CliRunner

from broker.directory import DirectoryBody, Role, sign_directory
from broker.keys import init_authority, init_participant, load_authority
from broker.management import ManagementClient
from broker.topology import (
    DELIVERY_LIMIT,
    QUARANTINE_EXCHANGE,
    ROUTING_QUEUE,
    inbox_queue,
    quarantine_queue,
)
from trm.cli import cli

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yml"
RABBITMQ_CONF = ROOT / "docker" / "rabbitmq" / "rabbitmq.conf"
ADMIN_SECRET = "rabbitmq_admin_definitions"


def _compose_config() -> dict[str, object]:
    if (
        shutil.which("docker")
        and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False
        ).returncode
        == 0
    ):
        command = ["docker", "compose", "-f", str(COMPOSE), "config"]
    else:
        assert shutil.which("docker-compose"), "install docker-compose (scripts/ensure-services)"
        command = ["docker-compose", "-f", str(COMPOSE), "config"]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr
    loaded = yaml.safe_load(result.stdout)
    assert isinstance(loaded, dict)
    return loaded


def _mount(volume: object) -> tuple[str, bool]:
    """(target, read-only) of a volume in either compose's output form."""
    if isinstance(volume, dict):
        return str(volume["target"]), bool(volume.get("read_only", False))
    parts = str(volume).split(":")
    return parts[1], parts[-1] == "ro"


def test_compose_config_is_valid() -> None:
    """`docker compose config` accepts docker/compose.yml."""
    config = _compose_config()
    services = config["services"]
    assert isinstance(services, dict)
    assert {"rabbitmq", "postgres", "routing", "adapter-iom-kz", "adapter-iom-uz"} <= set(services)


def test_services_are_hardened() -> None:
    """Every trm service restarts, has a health check, reads its keys read-only and gets secrets."""
    services = _compose_config()["services"]
    assert isinstance(services, dict)
    for name in ("routing", "adapter-iom-kz", "adapter-iom-uz"):
        service = services[name]
        assert service["restart"] == "unless-stopped"
        assert "healthcheck" in service
        assert service["secrets"], name
        assert ("/etc/trm/home", True) in [_mount(v) for v in service["volumes"]], name
    for name in ("rabbitmq", "postgres"):
        assert "healthcheck" in services[name]


def test_image_runs_as_non_root() -> None:
    """The final image stage switches to an unprivileged user."""
    stages = (ROOT / "docker" / "Dockerfile").read_text().split("\nFROM ")
    assert "USER trm" in stages[-1]
    assert "apt-get install" not in stages[-1]


# --- the broker as the stack boots it, on the local RabbitMQ ------------------------


def _compose_file() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(loaded, dict)
    return loaded


def _boot_definitions_path() -> str:
    """Where rabbitmq.conf has RabbitMQ load definitions from at boot."""
    for line in RABBITMQ_CONF.read_text().splitlines():
        key, _, value = line.partition("=")
        if key.strip() == "load_definitions":
            return value.strip()
    raise AssertionError(f"{RABBITMQ_CONF} loads no definitions")


def _under(target: str, path: str) -> bool:
    return target == path or target.startswith(path.rstrip("/") + "/")


def _boot_definitions(compose: dict[str, Any]) -> tuple[list[Path], list[str]]:
    """The repository files and the secrets the rabbitmq service loads as definitions at
    boot, each in the order RabbitMQ reads them (by name in the container)."""
    path = _boot_definitions_path()
    service = compose["services"]["rabbitmq"]
    files = []
    for volume in service["volumes"]:
        source, target = str(volume).split(":")[:2]
        if _under(target, path) and source.startswith("."):
            files.append((target, (COMPOSE.parent / source).resolve()))
    mounted = [
        (str(secret["target"]), str(secret["source"]))
        for secret in service.get("secrets", [])
        if isinstance(secret, dict) and _under(str(secret.get("target", "")), path)
    ]
    return [file for _, file in sorted(files)], [name for _, name in sorted(mounted)]


def _in_vhost(definitions: dict[str, Any], vhost: str) -> dict[str, Any]:
    """The definitions with every vhost name replaced by ``vhost``."""
    moved = {key: value for key, value in definitions.items() if key != "vhosts"}
    for key in ("exchanges", "queues", "bindings", "policies"):
        moved[key] = [{**item, "vhost": vhost} for item in definitions.get(key, [])]
    return moved


def _url_as(url: str, user: str, password: str, path: str) -> str:
    """``url`` with another user, password and path."""
    parts = urlsplit(url)
    host = parts.netloc.rpartition("@")[2]
    return parts._replace(netloc=f"{user}:{password}@{host}", path=path).geturl()


@pytest.fixture
def scratch(rabbitmq_urls: tuple[str, str]) -> Iterator[tuple[str, list[str]]]:
    """A scratch vhost name and a list of users the test made; both removed afterwards, the
    users unless another vhost still uses them."""
    client = ManagementClient(rabbitmq_urls[1])
    name, made = f"trm-stack-{uuid.uuid4().hex[:12]}", []
    try:
        yield name, made
    finally:
        users = set(client.vhost_users(name)) | set(made)
        client.delete_vhost(name)
        for user in sorted(users - {client.username}):
            client.delete_user_if_unused(user)


@pytest.mark.rabbitmq
def test_stack_definitions_then_provision_job(
    rabbitmq_urls: tuple[str, str],
    scratch: tuple[str, list[str]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The definitions RabbitMQ loads at boot, then the provision job's own command, succeed
    on a real broker: no queue argument clashes, and the administrator exists to log in."""
    vhost, made = scratch
    compose = _compose_file()
    job = compose["services"]["provision"]
    admin = ManagementClient(rabbitmq_urls[1])
    files, secret_names = _boot_definitions(compose)
    assert files, "no definitions file of the repository is loaded at boot"
    admin.create_vhost(vhost)
    for file in files:
        definitions = json.loads(file.read_text())
        named = {v["name"] for v in definitions.get("vhosts", [])}
        assert named <= {job["environment"]["TRM_AMQP_VHOST"]}, f"{file} names {named}"
        admin.request("POST", f"/definitions/{vhost}", _in_vhost(definitions, vhost))
    # RabbitMQ makes no default_user when it loads definitions at boot: the administrator
    # must come from them, as the secret that docker/secrets/README.md describes.
    assert secret_names == [ADMIN_SECRET]
    user, password = f"trm-admin-{uuid.uuid4().hex[:8]}", secrets.token_urlsafe(16)
    made.append(user)
    admin_definitions = {"users": [{"name": user, "password": password, "tags": "administrator"}]}
    admin.request("POST", "/definitions", admin_definitions)

    args, env = _provision_job(job, tmp_path, vhost, made)
    (tmp_path / "amqp_url").write_text(_url_as(rabbitmq_urls[0], user, password, f"/{vhost}"))
    (tmp_path / "management_url").write_text(_url_as(rabbitmq_urls[1], user, password, "/"))
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = CliRunner().invoke(cli, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output

    queues = {q.name: q for q in admin.list_queues(vhost)}
    routing = queues[ROUTING_QUEUE].arguments
    assert routing["x-delivery-limit"] == DELIVERY_LIMIT
    assert routing["x-dead-letter-exchange"] == QUARANTINE_EXCHANGE
    for participant in json.loads(result.stdout)["participants"]:
        assert {inbox_queue(participant), quarantine_queue(participant)} <= set(queues)


def _signed_directory(root: Path, roles: dict[str, Role]) -> tuple[Path, Path]:
    """A directory of ``roles`` signed by a new authority: (directory.json, authority.pub)."""
    init_authority(root / "authority")
    cards = tuple(
        init_participant(root / "homes" / pid, participant_id=pid, role=role, country="AT")
        for pid, role in roles.items()
    )
    body = DirectoryBody(serial=1, issued_at=datetime.now(UTC), participants=cards)
    directory = root / "directory.json"
    directory.write_bytes(sign_directory(body, load_authority(root / "authority")))
    return directory, root / "authority" / "authority.pub"


def _provision_job(
    job: dict[str, Any], tmp_path: Path, vhost: str, made: list[str]
) -> tuple[list[str], dict[str, str]]:
    """The provision job's command and environment, pointed at local files: the directory
    signed here for its participants (ids suffixed, to keep clear of other networks' users),
    the admin URLs in tmp_path/amqp_url and tmp_path/management_url."""
    suffix = uuid.uuid4().hex[:6]
    args = shlex.split(str(job["command"]))
    ids: dict[str, str] = {}
    for i in range(1, len(args)):
        if args[i - 1] == "--password-file":
            base = args[i].partition("=")[0]
            ids[base] = f"{base}-{suffix}"
            (tmp_path / base).write_text(secrets.token_urlsafe(16) + "\n")
            args[i] = f"{ids[base]}={tmp_path / base}"
    made.extend(ids.values())
    roles = {pid: Role.ROUTING if base == "routing" else Role.MISSION for base, pid in ids.items()}
    directory, authority = _signed_directory(tmp_path, roles)
    mounts = {"/etc/trm/directory.json": directory, "/etc/trm/authority.pub": authority}
    args = [str(mounts.get(arg, arg)) for arg in args]
    environment = {str(k): str(v) for k, v in job["environment"].items()}
    environment["TRM_AMQP_VHOST"] = vhost
    environment["TRM_AMQP_URL_FILE"] = str(tmp_path / "amqp_url")
    environment["TRM_AMQP_MANAGEMENT_URL_FILE"] = str(tmp_path / "management_url")
    return args, environment
