"""Local RabbitMQ clusters beside the machine's broker: for tests, campaigns and trying things.

`LocalCluster` starts N RabbitMQ nodes on 127.0.0.1 (``trm-<tag><i>@localhost``),
each with its own AMQP, management and Erlang distribution port, its own
data, log and configuration folders, and one Erlang cookie shared by the
cluster's nodes only, all under one root folder. The nodes boot in parallel;
nodes 2..N then join node 1 with ``rabbitmqctl stop_app / join_cluster /
start_app``. `LocalCluster.stop` stops every node and removes the root, so
nothing is left: no process, no port, no name registered with epmd, no file.

The machine's own broker is never touched: the nodes read none of
``/etc/rabbitmq`` (``RABBITMQ_CONF_ENV_FILE``, ``RABBITMQ_CONFIG_FILE`` and
``RABBITMQ_ENABLED_PLUGINS_FILE`` point into the root), and their cookie is
not its cookie. The federation plugins are enabled beside the management
plugin, so that two local clusters can be linked (`broker.federation`).

Ports, from a base port B (default 5680) and node i (0-based): AMQP B+i,
management B+10000+i, distribution B+20000+i. A second cluster takes another
base, e.g. 5690. ``scripts/rabbitmq-cluster`` is the command line over this
module (``python -m trm.localcluster start|stop|status``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from broker.errors import ConfigError

DEFAULT_BASE_PORT = 5680
DEFAULT_NODES = 3
MANAGEMENT_OFFSET = 10000
DIST_OFFSET = 20000
PLUGINS = ("rabbitmq_management", "rabbitmq_federation", "rabbitmq_federation_management")
BOOT_SECONDS = 120.0
STOP_SECONDS = 60.0
ENV_SBIN = "TRM_RABBITMQ_SBIN"
"""Where rabbitmq-server and rabbitmqctl live, if not beside the distribution's wrapper."""
_SBIN_GUESSES = ("/usr/lib/rabbitmq/bin",)


@dataclass(frozen=True)
class Node:
    """One node of a local cluster: its name, ports and folder."""

    name: str
    amqp_port: int
    management_port: int
    dist_port: int
    folder: Path

    @property
    def amqp_url(self) -> str:
        """The administrator's AMQP URL of this node (guest, from loopback only)."""
        return f"amqp://guest:guest@127.0.0.1:{self.amqp_port}/"

    @property
    def management_url(self) -> str:
        """The administrator's management API URL of this node."""
        return f"http://guest:guest@127.0.0.1:{self.management_port}/"

    @property
    def pid_file(self) -> Path:
        """Where the node writes the operating-system pid of its Erlang VM."""
        return self.folder / "node.pid"

    @property
    def group_file(self) -> Path:
        """Where the process group of the node's script and VM is recorded."""
        return self.folder / "node.pgid"


def _sbin() -> Path:
    """The folder of the real rabbitmq-server and rabbitmqctl scripts.

    The distribution's wrapper in /usr/sbin switches to the rabbitmq user and
    drops the environment that places a node; the scripts behind it do not.
    """
    given = os.environ.get(ENV_SBIN)
    candidates = [Path(given)] if given else [Path(p) for p in _SBIN_GUESSES]
    found = shutil.which("rabbitmq-server")
    if found:
        candidates.append(Path(found).resolve().parent)
    for folder in candidates:
        if (folder / "rabbitmq-server").exists() and (folder / "rabbitmqctl").exists():
            return folder
    raise ConfigError(
        f"no rabbitmq-server and rabbitmqctl found (looked in {', '.join(map(str, candidates))}); "
        f"install RabbitMQ or set {ENV_SBIN} to the folder holding them"
    )


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _port_open(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 1):
            return True
    except OSError:
        return False


def _group_alive(group: int) -> bool:
    """Whether a process of `group` runs; a zombie does not count.

    A node restarted by another process (a test, a campaign) stays its
    unreaped child once killed, and a zombie still belongs to its group.
    """
    try:
        os.killpg(group, 0)
    except OSError:
        return False
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text(encoding="ascii").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        # After the command: state, ppid, pgrp.
        if int(fields[2]) == group and fields[0] != "Z":
            return True
    return not Path("/proc/self/stat").exists()


def free_base_port(count: int, first: int = DEFAULT_BASE_PORT, step: int = 20) -> int:
    """The first base port from `first` (by `step`) whose ports and root are all free.

    Two test sessions or campaigns on one machine then run side by side, each
    on its own cluster; `LocalCluster.start` still refuses if another took the
    ports in between.
    """
    for base in range(first, first + 50 * step, step):
        candidate = LocalCluster(count=count, base_port=base)
        ports = [
            port
            for node in candidate.nodes
            for port in (node.amqp_port, node.management_port, node.dist_port)
        ]
        if not candidate.root.exists() and all(_port_free(port) for port in ports):
            return base
    raise ConfigError(f"no free ports for a {count}-node cluster from {first} on")


class LocalCluster:
    """A RabbitMQ cluster of `count` nodes on this machine, rooted at `root`."""

    def __init__(
        self,
        *,
        count: int = DEFAULT_NODES,
        base_port: int = DEFAULT_BASE_PORT,
        root: Path | None = None,
        tag: str | None = None,
    ) -> None:
        """Describe the cluster; nothing starts before `start`."""
        if not 1 <= count <= 9:
            raise ConfigError(f"--nodes must be 1 to 9, got {count}")
        if not 1024 < base_port < 65535 - DIST_OFFSET - count:
            raise ConfigError(f"--base-port {base_port} leaves no room for {count} nodes")
        self.count = count
        self.base_port = base_port
        self.tag = tag or f"p{base_port}n"
        self.root = root or Path(tempfile.gettempdir()) / f"trm-rabbitmq-{base_port}"
        self.cluster_name = f"trm-{base_port}"
        self._processes: dict[int, subprocess.Popen[bytes]] = {}
        self.nodes = [
            Node(
                name=f"trm-{self.tag}{i + 1}@localhost",
                amqp_port=base_port + i,
                management_port=base_port + MANAGEMENT_OFFSET + i,
                dist_port=base_port + DIST_OFFSET + i,
                folder=self.root / f"node{i + 1}",
            )
            for i in range(count)
        ]

    # --- addresses --------------------------------------------------------------

    @property
    def amqp_urls(self) -> list[str]:
        """Every node's administrator AMQP URL, node 1 first."""
        return [node.amqp_url for node in self.nodes]

    @property
    def amqp_url(self) -> str:
        """All the nodes' addresses as one comma-separated TRM_AMQP_URL."""
        return ",".join(self.amqp_urls)

    @property
    def management_url(self) -> str:
        """Node 1's management API (any node's answers for the whole cluster)."""
        return self.nodes[0].management_url

    # --- life cycle -----------------------------------------------------------------

    def start(self) -> None:
        """Boot every node in parallel and join them into one cluster; stop all on failure."""
        busy = [
            port
            for node in self.nodes
            for port in (node.amqp_port, node.management_port, node.dist_port)
            if not _port_free(port)
        ]
        if busy or self.root.exists():
            raise ConfigError(
                f"cannot start the cluster on base port {self.base_port}: "
                + (f"ports {busy} are taken" if busy else f"{self.root} exists")
                + "; stop it first (scripts/rabbitmq-cluster stop) or choose --base-port"
            )
        try:
            self._write_files()
            with ThreadPoolExecutor(self.count) as pool:
                list(pool.map(self.start_node, range(self.count)))
                # Joins one at a time (each changes the membership); stops and starts at once.
                list(pool.map(lambda i: self.ctl(i, "stop_app"), range(1, self.count)))
                for i in range(1, self.count):
                    self.ctl(i, "join_cluster", self.nodes[0].name)
                list(pool.map(self._start_app, range(1, self.count)))
        except BaseException:
            self.stop()
            raise

    def _write_files(self) -> None:
        home = self.root / "home"
        home.mkdir(parents=True, mode=0o700)
        cookie = home / ".erlang.cookie"
        cookie.write_text(secrets.token_hex(20), encoding="ascii")
        cookie.chmod(0o400)
        for node in self.nodes:
            node.folder.mkdir(parents=True)
            (node.folder / "rabbitmq-env.conf").write_text("", encoding="utf-8")
            (node.folder / "enabled_plugins").write_text(
                f"[{','.join(PLUGINS)}].\n", encoding="utf-8"
            )
            (node.folder / "rabbitmq.conf").write_text(
                "\n".join(
                    [
                        f"listeners.tcp.1 = 127.0.0.1:{node.amqp_port}",
                        "management.tcp.ip = 127.0.0.1",
                        f"management.tcp.port = {node.management_port}",
                        f"cluster_name = {self.cluster_name}",
                        "",
                    ]
                ),
                encoding="utf-8",
            )

    def _environment(self, node: Node) -> dict[str, str]:
        env = {
            key: value
            for key, value in os.environ.items()
            if not key.startswith(("RABBITMQ_", "ERL_"))
        }
        env.update(
            HOME=str(self.root / "home"),
            RABBITMQ_NODENAME=node.name,
            RABBITMQ_NODE_IP_ADDRESS="127.0.0.1",
            RABBITMQ_NODE_PORT=str(node.amqp_port),
            RABBITMQ_DIST_PORT=str(node.dist_port),
            RABBITMQ_CONF_ENV_FILE=str(node.folder / "rabbitmq-env.conf"),
            RABBITMQ_CONFIG_FILE=str(node.folder / "rabbitmq.conf"),
            RABBITMQ_ENABLED_PLUGINS_FILE=str(node.folder / "enabled_plugins"),
            RABBITMQ_MNESIA_BASE=str(node.folder / "mnesia"),
            RABBITMQ_LOG_BASE=str(node.folder / "log"),
            RABBITMQ_PID_FILE=str(node.pid_file),
            RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS="-kernel inet_dist_use_interface {127,0,0,1}",
            ERL_EPMD_ADDRESS="127.0.0.1",
            ERL_CRASH_DUMP=str(node.folder / "erl_crash.dump"),
        )
        return env

    def ctl(self, index: int, *args: str, timeout: float = 60) -> str:
        """Run ``rabbitmqctl -n NODE ARGS`` for node `index`; its output, or ConfigError."""
        node = self.nodes[index]
        try:
            done = subprocess.run(
                [str(_sbin() / "rabbitmqctl"), "-n", node.name, *args],
                env=self._environment(node),
                cwd=node.folder,
                capture_output=True,
                text=True,
                timeout=timeout,
                check=False,
            )
        except subprocess.TimeoutExpired as e:
            raise ConfigError(
                f"rabbitmqctl {' '.join(args)} on {node.name} took over {timeout} s"
            ) from e
        if done.returncode != 0:
            raise ConfigError(
                f"rabbitmqctl {' '.join(args)} on {node.name} failed ({done.returncode}): "
                f"{(done.stderr or done.stdout).strip()[-400:]}"
            )
        return done.stdout

    def start_node(self, index: int) -> None:
        """Boot node `index` (again, keeping its data) and wait until it runs."""
        node = self.nodes[index]
        env = self._environment(node)
        (node.folder / "log").mkdir(exist_ok=True)
        node.pid_file.unlink(missing_ok=True)
        console_path = node.folder / "log" / "console.log"
        with console_path.open("ab") as console:
            self._processes[index] = process = subprocess.Popen(
                [str(_sbin() / "rabbitmq-server")],
                env=env,
                cwd=node.folder,
                stdin=subprocess.DEVNULL,
                stdout=console,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        # The process group holds the script and the VM: what `stop_node` ends
        # when the VM has not (yet) written its pid file.
        node.group_file.write_text(str(process.pid), encoding="ascii")
        # await_startup gives up at once on a node not yet registered with epmd.
        deadline = time.monotonic() + BOOT_SECONDS
        while not _port_open(node.dist_port):
            if process.poll() is not None or time.monotonic() > deadline:
                tail = console_path.read_text(encoding="utf-8", errors="replace")[-600:]
                raise ConfigError(f"node {node.name} did not boot: {tail.strip()}")
            time.sleep(0.1)
        self._await_startup(index)

    def _await_startup(self, index: int) -> None:
        self.ctl(index, "await_startup", "--timeout", str(int(BOOT_SECONDS)), timeout=BOOT_SECONDS)

    def _start_app(self, index: int) -> None:
        self.ctl(index, "start_app", timeout=BOOT_SECONDS)
        self._await_startup(index)

    def pid(self, index: int) -> int | None:
        """The pid of node `index`'s Erlang VM while it runs, else None."""
        try:
            pid = int(self.nodes[index].pid_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        try:
            os.kill(pid, 0)
        except OSError:
            return None
        return pid

    def _group(self, index: int) -> int | None:
        """The process group of node `index` while any process of it lives, else None."""
        try:
            group = int(self.nodes[index].group_file.read_text(encoding="ascii").strip())
        except (OSError, ValueError):
            return None
        return group if _group_alive(group) else None

    def stop_node(self, index: int) -> None:
        """Stop node `index` cleanly (SIGTERM: RabbitMQ shuts down in order); killed after 60 s."""
        group = self._group(index)
        if group is None:
            return
        pid = self.pid(index)
        if pid is not None:
            os.kill(pid, signal.SIGTERM)
        else:
            os.killpg(group, signal.SIGTERM)
        try:
            self._wait_gone(index, group, STOP_SECONDS)
        except ConfigError:
            os.killpg(group, signal.SIGKILL)
            self._wait_gone(index, group, STOP_SECONDS)

    def kill_node(self, index: int) -> None:
        """SIGKILL node `index`'s VM and script, as a crash would, and wait until they are gone."""
        group = self._group(index)
        if group is None:
            return
        pid = self.pid(index)
        if pid is not None:
            os.kill(pid, signal.SIGKILL)
        os.killpg(group, signal.SIGKILL)
        self._wait_gone(index, group, STOP_SECONDS)

    def _wait_gone(self, index: int, group: int, seconds: float) -> None:
        node = self.nodes[index]
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            process = self._processes.get(index)
            if process is not None:
                process.poll()  # reaps our own child, which would otherwise linger as a zombie
            if not _group_alive(group) and not (
                _port_open(node.amqp_port) or _port_open(node.dist_port)
            ):
                return
            time.sleep(0.1)
        raise ConfigError(f"node {node.name} (group {group}) did not end within {seconds:.0f} s")

    def stop(self) -> None:
        """End every node (SIGKILL) and remove the root folder; safe when nothing runs."""
        errors: list[str] = []
        with ThreadPoolExecutor(self.count) as pool:
            for i, outcome in enumerate(pool.map(self._stop_quietly, range(self.count))):
                if outcome:
                    errors.append(f"{self.nodes[i].name}: {outcome}")
        for stray in self.root.glob("node*/node.pgid"):
            # A node of a larger cluster started on this root earlier.
            with contextlib.suppress(OSError, ValueError):
                os.killpg(int(stray.read_text(encoding="ascii").strip()), signal.SIGKILL)
        shutil.rmtree(self.root, ignore_errors=True)
        if errors:
            raise ConfigError("; ".join(errors))

    def _stop_quietly(self, index: int) -> str:
        try:
            # The data goes with the root: no need for an orderly shutdown.
            self.kill_node(index)
        except (ConfigError, OSError) as e:
            return str(e)
        return ""

    # --- status ---------------------------------------------------------------------

    def leftovers(self) -> list[str]:
        """What is left of the cluster: its root, epmd names, listening ports, processes."""
        found = [str(self.root)] if self.root.exists() else []
        names = subprocess.run(
            ["epmd", "-names"], capture_output=True, text=True, timeout=10, check=False
        ).stdout.split()
        found += [n.name for n in self.nodes if n.name.split("@")[0] in names]
        found += [
            f"port {port}"
            for node in self.nodes
            for port in (node.amqp_port, node.management_port, node.dist_port)
            if _port_open(port)
        ]
        processes = subprocess.run(
            ["ps", "-eo", "args"], capture_output=True, text=True, timeout=10, check=False
        ).stdout
        found += [f"a process of {n.name}" for n in self.nodes if n.name in processes]
        return found

    def running(self) -> list[str]:
        """The cluster's running nodes, as node 1 (else the first that answers) sees them."""
        for index in range(self.count):
            if self._group(index) is None:
                continue
            try:
                status = json.loads(self.ctl(index, "cluster_status", "--formatter", "json"))
            except (ConfigError, ValueError):
                continue
            return sorted(status.get("running_nodes", []))
        return []

    def status(self) -> dict[str, object]:
        """What runs: each node's name, ports and pid, and the running members."""
        return {
            "root": str(self.root),
            "cluster_name": self.cluster_name,
            "amqp_url": self.amqp_url,
            "management_url": self.management_url,
            "nodes": [
                {
                    "name": node.name,
                    "amqp_port": node.amqp_port,
                    "management_port": node.management_port,
                    "dist_port": node.dist_port,
                    "pid": self.pid(i),
                }
                for i, node in enumerate(self.nodes)
            ],
            "running": self.running(),
        }


def main(argv: Sequence[str] | None = None) -> int:
    """``start|stop|status [--nodes N] [--base-port B] [--root DIR]``; exit 0 on success."""
    parser = argparse.ArgumentParser(
        prog="rabbitmq-cluster", description="A local RabbitMQ cluster beside the default broker."
    )
    parser.add_argument("action", choices=["start", "stop", "status"])
    parser.add_argument("--nodes", type=int, default=DEFAULT_NODES)
    parser.add_argument("--base-port", type=int, default=DEFAULT_BASE_PORT)
    parser.add_argument("--root", type=Path, default=None)
    args = parser.parse_args(argv)
    try:
        cluster = LocalCluster(count=args.nodes, base_port=args.base_port, root=args.root)
        if args.action == "start":
            cluster.start()
            print(cluster.amqp_url)
        elif args.action == "stop":
            cluster.stop()
        else:
            print(json.dumps(cluster.status(), indent=2))
    except ConfigError as e:
        print(f"rabbitmq-cluster: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
