"""Participant consoles served on free loopback ports in threads of one process.

`trm demo --console` leaves one running for each participant of the
story, and the browser tests drive them; each is the console
`console.app.create_app` makes for a home, served by uvicorn on
``127.0.0.1`` at a port the system chose, and answers only to that
address (the console's Host check).
"""

from __future__ import annotations

import secrets
import socket
import threading
from dataclasses import dataclass, field

import uvicorn
from sqlalchemy.engine import Engine

from adapters.home import Home
from broker.errors import ConfigError
from console.accounts import Role, add_user
from console.app import create_app, served_as

HOST = "127.0.0.1"
START_SECONDS = 30.0
"""How long a console may take to start answering (only a hung machine needs it)."""


@dataclass(frozen=True)
class Login:
    """An account made for a console, with the password shown once."""

    username: str
    password: str
    role: Role


@dataclass
class ServedConsole:
    """One console being served; `stop` ends it."""

    participant: str
    url: str
    home: Home
    engine: Engine
    server: uvicorn.Server
    thread: threading.Thread
    listening: socket.socket
    logins: list[Login] = field(default_factory=list)

    def add_login(
        self, username: str, role: Role = Role.CASE_WORKER, language: str = "en"
    ) -> Login:
        """A new account on this console with a random password."""
        password = secrets.token_urlsafe(12)
        add_user(self.engine, username, password, role, language)
        login = Login(username, password, role)
        self.logins.append(login)
        return login

    def stop(self, timeout: float = 10.0) -> None:
        """Ask the server to finish its requests and stop; wait for its thread."""
        self.server.should_exit = True
        self.thread.join(timeout)
        if self.thread.is_alive():
            self.server.force_exit = True
            self.thread.join(timeout)
        self.listening.close()


def serve_console(home: Home) -> ServedConsole:
    """Serve `home`'s console on a free port of 127.0.0.1; returns once it is listening."""
    listening = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listening.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listening.bind((HOST, 0))
    port = int(listening.getsockname()[1])
    app = create_app(home, allowed_hosts=served_as(HOST, port))
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="on")
    server = uvicorn.Server(config)
    thread = threading.Thread(
        target=server.run,
        kwargs={"sockets": [listening]},
        name=f"console-{home.participant_id}",
        daemon=True,
    )
    thread.start()
    started = threading.Event()
    for _ in range(int(START_SECONDS / 0.05)):
        if server.started or not thread.is_alive():
            break
        started.wait(0.05)
    if not server.started:
        server.should_exit = True
        listening.close()
        raise ConfigError(f"the console of {home.participant_id} did not start on port {port}")
    engine = app.state.console.engine
    url = f"http://{HOST}:{port}"
    return ServedConsole(home.participant_id, url, home, engine, server, thread, listening)
