"""``python -m service [--host H] [--port P]``: every other setting comes from ``ISOQUANT_*`` variables.

SIGTERM/SIGINT: the service turns not-ready at once, optionally keeps serving for ``drain_seconds``
(so load balancers see it), then uvicorn stops accepting, finishes the accepted requests (those still
open ``job_timeout_s`` + 2 s later get 503), drops the device jobs not yet started and waits for the
running ones before the process exits (docs/OPERATIONS.md, "Shutdown", has the bound and its measurement).

``ISOQUANT_PROCESSES=N`` (N > 1) runs N server processes on one port (service/supervisor.py).
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
import signal  # noqa: E402
import sys  # noqa: E402

from pydantic import ValidationError  # noqa: E402

from service.settings import Settings  # noqa: E402
from service.supervisor import configure_logging, serve, supervise  # noqa: E402


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m service", description=__doc__.split("\n")[0])
    parser.add_argument("--host", help="bind address (default: ISOQUANT_HOST or 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port (default: ISOQUANT_PORT or 8000; 0 picks a free one)")
    args = parser.parse_args(argv)
    overrides = {k: v for k, v in (("host", args.host), ("port", args.port)) if v is not None}
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        sys.exit(settings_error(exc))
    configure_logging(settings)
    if settings.processes == 1:
        if serve(settings):  # SIGINT (Ctrl-C), served out: end as interrupted, SIGINT's own way, not by traceback
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGINT)
    else:
        status = supervise(settings, overrides)
        # The supervisor has nothing left to finalize (its sockets are closed, its metrics folder removed), and
        # the interpreter's teardown after `import torch` (which the settings import) took 0.45-0.72 s on a
        # 2-core CPU: most of what a shutdown with several processes took after its last server process
        # exited (0.6 of 0.8-1.0 s). So it ends here, once its log is written.
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)


def settings_error(exc: ValidationError) -> str:
    """One line a problem naming the variable to fix, without any input value: pydantic's own report
    echoes the whole settings dict, the API key included."""
    lines = ["invalid settings:"]
    for error in exc.errors(include_input=False, include_url=False):
        names = [str(part) for part in error["loc"] if part != "__root__"]
        variable = ", ".join(f"ISOQUANT_{name.upper()}" for name in names) or "ISOQUANT_* settings"
        lines.append(f"  {variable}: {error['msg']}")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
