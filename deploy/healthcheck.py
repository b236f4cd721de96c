"""Container health check: exit 0 when GET /health/ready answers 200, 1 otherwise.

Standard library only (slim images have no curl). The Dockerfile's HEALTHCHECK and the compose file's
healthcheck run it. The URL is the first argument, else http://127.0.0.1:$ISOQUANT_PORT/health/ready.
On failure it prints why (the service's error message, e.g. "warming up: 4 of 27 quantizers built and
run"), which `docker inspect` shows in the container's health log.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request


def main(argv: list[str]) -> int:
    url = argv[1] if len(argv) > 1 else f"http://127.0.0.1:{os.environ.get('ISOQUANT_PORT', '8000')}/health/ready"
    try:
        with urllib.request.urlopen(url, timeout=4) as response:
            status = response.status
    except urllib.error.HTTPError as exc:
        print(f"not ready: HTTP {exc.code}: {exc.read(500).decode(errors='replace')}", file=sys.stderr)
        return 1
    except (urllib.error.URLError, OSError, ValueError) as exc:
        print(f"not ready: {exc}", file=sys.stderr)
        return 1
    if status != 200:
        print(f"not ready: HTTP {status}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
