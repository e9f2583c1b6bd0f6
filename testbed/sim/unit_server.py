"""The process behind a configuration's unit that has a ``port``: a tiny HTTP server.

Imitates a NixOS web service as rebuild's checks see it: it listens on the host's address and
the unit's port and answers every ``GET``/``HEAD`` with the configured status (``http_status``,
default 200) and a body naming the unit and the configuration's label, so a deploy that changed
the label is visible in the answer. It tells :func:`testbed.sim.units.start_config_unit` that
it listens through a pipe (``--ready-fd``), as ``Type=notify`` would, and exits on SIGTERM.
Started as ``rbtb-sim unit-server``.
"""

from __future__ import annotations

import os
import signal
import sys
from typing import Any

from testbed.sim.host import internal_opts


def serve(argv: list[str]) -> int:
    """``rbtb-sim unit-server --addr A --port P --status S --body B --ready-fd FD``."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    opts, _ = internal_opts(argv)
    status = int(opts["--status"])
    body = (opts.get("--body", "") + "\n").encode()

    class Handler(BaseHTTPRequestHandler):
        server_version = "rebuild-testbed"

        def _reply(self, with_body: bool) -> None:
            self.send_response(status)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if with_body:
                self.wfile.write(body)

        def do_GET(self) -> None:
            self._reply(True)

        def do_HEAD(self) -> None:
            self._reply(False)

        def log_message(self, format: str, *args: Any) -> None:
            sys.stderr.write(f"{self.address_string()} {format % args}\n")

    ready_fd = int(opts["--ready-fd"])
    try:
        server = ThreadingHTTPServer((opts["--addr"], int(opts["--port"])), Handler)
    except OSError as exc:
        print(
            f"cannot listen on {opts['--addr']}:{opts['--port']}: {exc.strerror}", file=sys.stderr
        )
        sys.stderr.flush()
        os.close(ready_fd)
        return 1
    os.write(ready_fd, b"ok\n")
    os.close(ready_fd)
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    server.serve_forever()
    return 0
