"""``python -m service [--host H] [--port P]``: every other setting comes from ``ISOQUANT_*`` variables.

SIGTERM/SIGINT: the service turns not-ready at once, optionally keeps serving for ``drain_seconds``
(so load balancers see it), then uvicorn stops accepting, finishes the accepted requests, and the
lifespan waits for queued device work before the process exits.
"""

from __future__ import annotations

import os

# Before torch loads OpenMP: threads that finish a parallel region sleep instead of spinning. The
# service calls torch from several threads (event loop, decode pool, device workers), each with its own
# OpenMP team; spinning teams starved the device worker on a 2-core machine (a 65,536-vector /quantize
# took 2.3x the library's time; with PASSIVE, 1.04x). An explicit OMP_WAIT_POLICY wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse  # noqa: E402
import logging  # noqa: E402
import threading  # noqa: E402

import uvicorn  # noqa: E402

from service.app import create_app  # noqa: E402
from service.settings import Settings  # noqa: E402


class _Server(uvicorn.Server):
    """uvicorn's server with a not-ready phase before the graceful shutdown."""

    def __init__(self, config: uvicorn.Config, app, settings: Settings) -> None:
        super().__init__(config)
        self._app = app
        self._settings = settings
        self._draining = False

    def handle_exit(self, sig, frame) -> None:
        engine = self._app.state.isoquant.engine
        if engine is not None:
            engine.begin_shutdown()
        if self._settings.drain_seconds > 0 and not self._draining:
            self._draining = True
            logging.getLogger("service").info(
                "signal %s: not ready; draining for %.1f s", sig, self._settings.drain_seconds
            )
            timer = threading.Timer(self._settings.drain_seconds, super().handle_exit, (sig, frame))
            timer.daemon = True
            timer.start()
            return
        super().handle_exit(sig, frame)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="bind address (default: ISOQUANT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: ISOQUANT_PORT or 8000; 0 picks a free one)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    settings = Settings(**overrides)
    logging.basicConfig(
        level=settings.log_level.upper() if settings.log_level != "trace" else "DEBUG",
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=max(settings.job_timeout_s, 1.0) + 5.0,
        access_log=settings.log_level in ("debug", "trace"),
    )
    _Server(config, app, settings).run()


if __name__ == "__main__":
    main()
