"""Keeps the process honest about its engine: tells systemd the state (sd_notify READY once the server
listens, STATUS, and WATCHDOG pings while the engine is healthy), and ends the process when the engine
cannot go on, so that systemd (Restart=on-failure) starts it afresh instead of leaving a process that
answers 503 forever.

- Engine failed (`failure()`): exit with EXIT_ENGINE_FAILED after the in-flight requests, which the
  engine has already failed, are answered.
- Engine loop stuck in one turn longer than `engine_stall_timeout_s`: the thread cannot be stopped, so the
  stacks of every thread go to the log and the process ends at once (os._exit).
- Event loop stuck: nothing here runs, so no WATCHDOG ping reaches systemd, which kills and restarts the
  service after WatchdogSec.
"""

from __future__ import annotations

import faulthandler
import logging
import os
import socket
import sys
from collections.abc import Callable, Mapping

from app.api.services import Services

log = logging.getLogger("app")

EXIT_ENGINE_FAILED = 3
EXIT_ENGINE_STALLED = 4


class Notifier:
    """sd_notify(3): KEY=VALUE lines in one datagram to the socket systemd names in NOTIFY_SOCKET. Without
    one (not under systemd, or NotifyAccess unset) every call does nothing."""

    def __init__(self, environ: Mapping[str, str] = os.environ) -> None:
        address = environ.get("NOTIFY_SOCKET", "")
        # "@name" is Linux's abstract namespace.
        self._address = "\0" + address[1:] if address.startswith("@") else address
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) if address else None
        if self._socket is not None:
            # Called from the event loop: a reader that stopped reading must not stop the server.
            self._socket.setblocking(False)
        self.watchdog = bool(environ.get("WATCHDOG_USEC"))

    def notify(self, **fields: str) -> None:
        if self._socket is None:
            return
        message = "\n".join(f"{key}={value}" for key, value in fields.items()).encode()
        try:
            self._socket.sendto(message, self._address)
        except BlockingIOError:
            pass  # the reader's queue is full; the next message says the same
        except OSError as exc:  # systemd gone: nothing the app can do about it
            log.warning("sd_notify failed", extra={"fields": {"error": str(exc)}})


class Supervisor:
    def __init__(
        self,
        services: Services,
        notifier: Notifier,
        request_exit: Callable[[int], None],
        abort: Callable[[int], None] = os._exit,
    ) -> None:
        self.services = services
        self.notifier = notifier
        self._request_exit = request_exit
        self._abort = abort
        self._last_status = ""
        self._told_ready = False
        self.exit_code = 0

    def check(self) -> None:
        """Called about once a second from the event loop, the first time once the server listens."""
        if not self._told_ready:
            # Type=notify: systemd arms the watchdog at READY, not at exec, so the imports and the
            # server's start (tens of seconds on a busy host) are bounded by TimeoutStartSec instead of
            # being killed for missing pings nothing could have sent yet. The model may still be loading:
            # /ready and STATUS say when it is.
            self.notifier.notify(READY="1")
            self._told_ready = True
        services = self.services
        engine = services.engine
        state = services.state()
        if engine is not None and engine.failure() is not None and self.exit_code == 0:
            log.error(
                "the engine cannot go on: exiting so that the service is restarted",
                extra={"fields": {"failure": engine.failure()}},
            )
            self.exit_code = EXIT_ENGINE_FAILED
            services.draining = True
            self._request_exit(EXIT_ENGINE_FAILED)
        elif engine is not None and engine.busy_for() > services.settings.engine_stall_timeout_s:
            log.critical(
                "the engine loop is stuck: exiting so that the service is restarted",
                extra={"fields": {"stuck_s": round(engine.busy_for(), 1)}},
            )
            faulthandler.dump_traceback(file=sys.stderr, all_threads=True)
            self._abort(EXIT_ENGINE_STALLED)
            return
        if state != self._last_status:
            self.notifier.notify(STATUS=state)
            self._last_status = state
        if self.notifier.watchdog and self.exit_code == 0:
            self.notifier.notify(WATCHDOG="1")
