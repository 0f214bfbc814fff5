"""The deployable stack in docker/ stays valid."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
COMPOSE = ROOT / "docker" / "compose.yml"


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
