"""Runs both simulators on loopback, each a uvicorn server in a background thread."""

from __future__ import annotations

import argparse
import contextlib
import logging
import socket
import threading
import time
from types import TracebackType
from typing import Any

import httpx
import uvicorn
from starlette.types import ASGIApp

from simulators.faults import Faults
from simulators.scenario import Scenario, load_scenario
from simulators.services_manager_app import ServicesManagerApp, SmState
from simulators.sharefile_app import SHAREFILE_PAGE_SIZE, SharefileApp, SharefileState

_START_TIMEOUT_S = 10.0
_STOP_TIMEOUT_S = 5.0
# In-flight requests (a hanging timeout customer) get this long before shutdown cancels them.
_GRACEFUL_SHUTDOWN_S = 1


class _BackgroundServer:
    """One uvicorn server on a socket we bound ourselves (so port 0 tells us the real port)."""

    def __init__(self, app: ASGIApp, host: str, port: int, name: str) -> None:
        self._socket = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            self._socket.bind((host, port))
        except OSError:
            self._socket.close()
            raise
        self.port: int = self._socket.getsockname()[1]
        config = uvicorn.Config(
            app,
            log_config=None,  # leave the host process's logging configuration alone
            log_level="warning",
            access_log=False,
            lifespan="off",
            ws="none",  # no websockets: avoids importing (deprecated) ws implementations
            proxy_headers=False,
            server_header=False,
            timeout_graceful_shutdown=_GRACEFUL_SHUTDOWN_S,
        )
        self.server = uvicorn.Server(config)
        # uvicorn installs signal handlers only on the main thread, so a thread is safe here.
        self._thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [self._socket]}, name=name, daemon=True
        )

    def start(self) -> None:
        self._thread.start()
        deadline = time.monotonic() + _START_TIMEOUT_S
        while not self.server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"{self._thread.name} did not start")
            time.sleep(0.005)

    def request_stop(self) -> None:
        self.server.should_exit = True

    def stop(self) -> None:
        self.server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(_STOP_TIMEOUT_S)
        if self._thread.is_alive():
            self.server.force_exit = True
            self._thread.join(_STOP_TIMEOUT_S)
        self._socket.close()


class SimulatorServers:
    """The Services Manager and ShareFile simulators over one scenario, with their faults."""

    def __init__(
        self,
        scenario: Scenario,
        *,
        sm_faults: Faults = Faults(),  # noqa: B008 - frozen, so one shared default is safe
        sharefile_faults: Faults = Faults(),  # noqa: B008
        sharefile_page_size: int | None = SHAREFILE_PAGE_SIZE,
        host: str = "127.0.0.1",
        sm_port: int = 0,
        sharefile_port: int = 0,
        token_ttl_s: int = 28800,
        apply_delay_s: float = 0.0,
    ) -> None:
        self.scenario = scenario
        self.host = host
        self._ports = (sm_port, sharefile_port)
        self._sm_state = SmState(scenario, apply_delay_s=apply_delay_s)
        self._sm_app = ServicesManagerApp(scenario, self._sm_state, sm_faults)
        self._sharefile_state = SharefileState(scenario, token_ttl_s=token_ttl_s)
        self._sharefile_app = SharefileApp(
            self._sharefile_state, sharefile_faults, page_size=sharefile_page_size
        )
        self._servers: list[_BackgroundServer] = []
        self._sm_root: str | None = None
        self._sharefile_root: str | None = None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> None:
        """Start both servers; return once each has answered a health check."""
        if self._servers:
            raise RuntimeError("SimulatorServers already started")
        self._sm_app.stopping.clear()
        self._sharefile_app.stopping.clear()
        try:
            sm = _BackgroundServer(self._sm_app.app, self.host, self._ports[0], "sim-sm")
            self._servers.append(sm)
            sharefile = _BackgroundServer(
                self._sharefile_app.app, self.host, self._ports[1], "sim-sharefile"
            )
            self._servers.append(sharefile)
            for server in self._servers:
                server.start()
            host = f"[{self.host}]" if ":" in self.host else self.host
            self._sm_root = f"http://{host}:{sm.port}"
            self._sharefile_root = f"http://{host}:{sharefile.port}"
            with httpx.Client(trust_env=False, timeout=5.0) as client:
                for root in (self._sm_root, self._sharefile_root):
                    client.get(f"{root}/_sim/health").raise_for_status()
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        self._sm_app.stopping.set()
        self._sharefile_app.stopping.set()
        # Ask both first: uvicorn notices should_exit on its next 0.1 s tick, so the two
        # shutdowns overlap instead of adding up.
        for server in self._servers:
            server.request_stop()
        for server in self._servers:
            server.stop()
        self._servers = []

    def __enter__(self) -> SimulatorServers:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where to reach them ---------------------------------------------------------------------

    def _root(self, root: str | None) -> str:
        if root is None:
            raise RuntimeError("SimulatorServers is not started")
        return root

    @property
    def sm_root_url(self) -> str:
        """The SM simulator's root (for the out-of-contract /_sim endpoints)."""
        return self._root(self._sm_root)

    @property
    def sharefile_root_url(self) -> str:
        return self._root(self._sharefile_root)

    @property
    def sm_url(self) -> str:
        return f"{self._root(self._sm_root)}/api/v1"

    @property
    def sharefile_token_url_template(self) -> str:
        return f"{self._root(self._sharefile_root)}/{{subdomain}}/oauth/token"

    @property
    def sharefile_api_url_template(self) -> str:
        return f"{self._root(self._sharefile_root)}/{{subdomain}}/sf/v3/"

    @property
    def sm_token(self) -> str:
        return self.scenario.sm_token

    @property
    def sharefile_credentials(self) -> dict[str, str]:
        return dict(self.scenario.sharefile_credentials)

    # -- what happened -----------------------------------------------------------------------

    def sm_states(self) -> dict[str, dict[str, str]]:
        """customer_id -> user_id -> current sharefile.state, after applying due transitions."""
        return self._sm_state.states()

    def submissions(self) -> list[dict[str, Any]]:
        """Every POST of a bulk request, in arrival order, including replays and 400/404 answers.

        Each is {"customer_id", "request_id", "items", "replayed", "status_code"}; `items` are the
        posted items (normalised to {"user_id", "action"} once the request validated).
        """
        with self._sm_state.lock:
            return [dict(entry) for entry in self._sm_state.submissions]

    def duplicate_effective_submissions(self) -> int:
        """Items that asked again for a change SM had already taken through another request.

        Counted over every first-time (not replayed) valid bulk request: an item counts when the
        last change SM *accepted* for that user — still in flight or already applied — came from a
        different request_id and had the same action. SM rejects such an item (request_in_flight
        or already_in_state), so no state changes twice here, but a real portal would bill or
        notify twice; it means two runs planned the same change, e.g. a redelivered command that
        minted a new request_id. A replay of the same request_id is not counted, nor is a change
        that undoes the last one (provision after an accepted deprovision). Stays 0 in a correct
        system.
        """
        with self._sm_state.lock:
            return self._sm_state.duplicate_effective

    # -- steering ----------------------------------------------------------------------------

    def set_faults(self, *, sm: Faults | None = None, sharefile: Faults | None = None) -> None:
        """Change faults while running; each new Faults restarts its seeded random sequence."""
        if sm is not None:
            self._sm_app.set_faults(sm)
        if sharefile is not None:
            self._sharefile_app.set_faults(sharefile)

    def expire_tokens(self) -> None:
        """Invalidate every ShareFile access token issued so far (refresh tokens stay valid)."""
        self._sharefile_state.expire_access_tokens()


def main(argv: list[str] | None = None) -> None:
    """Serve a scenario until interrupted: `python -m simulators.servers [scenario file]`."""
    from simulators.scenario import DEMO_SCENARIO_PATH

    parser = argparse.ArgumentParser(description="Run the SM and ShareFile simulators.")
    parser.add_argument("scenario", nargs="?", default=str(DEMO_SCENARIO_PATH))
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--sm-port", type=int, default=8081)
    parser.add_argument("--sharefile-port", type=int, default=8082)
    parser.add_argument(
        "--page-size", type=int, default=SHAREFILE_PAGE_SIZE, help="0 serves feeds unpaged"
    )
    parser.add_argument("--apply-delay", type=float, default=0.0)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO)
    servers = SimulatorServers(
        load_scenario(args.scenario),
        host=args.host,
        sm_port=args.sm_port,
        sharefile_port=args.sharefile_port,
        sharefile_page_size=args.page_size or None,
        apply_delay_s=args.apply_delay,
    )
    with servers:
        print(f"Services Manager: {servers.sm_url}  (token {servers.sm_token})")
        print(f"ShareFile API:    {servers.sharefile_api_url_template}")
        print(f"ShareFile token:  {servers.sharefile_token_url_template}")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait()


if __name__ == "__main__":
    main()
