"""Against a real `python -m service` process on a free port: readiness, both body formats, metrics, and
SIGTERM (not ready at once, the accepted request finishes, then the process exits)."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from kernels import Quantizer
from tests.service.conftest import SAFETENSORS, b64, unb64

ROOT = Path(__file__).resolve().parents[2]
pytestmark = pytest.mark.slow


@pytest.fixture
def server(tmp_path):
    """Start the service on port 0 (the OS picks a free one), read the port from uvicorn's log, yield
    (base_url, process); always stopped afterwards."""
    log_path = tmp_path / "server.log"
    env = {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "ISOQUANT_WARM_VARIANTS": "full",
        "ISOQUANT_WARM_DIMS": "128,256",
        "ISOQUANT_WARM_BITS": "3",
        "ISOQUANT_WARM_DTYPES": "float16,float32",
        "ISOQUANT_DRAIN_SECONDS": "1.5",
        "ISOQUANT_MAX_VECTORS": "65536",
    }
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "service", "--host", "127.0.0.1", "--port", "0"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 90
        port = None
        while port is None:
            match = re.search(rb"Uvicorn running on http://127\.0\.0\.1:(\d+)", log_path.read_bytes())
            if match:
                port = int(match.group(1))
            elif process.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"server did not start (rc={process.poll()}):\n{log_path.read_text()}")
            else:
                time.sleep(0.05)
        yield f"http://127.0.0.1:{port}", process, log_path
    finally:
        if process.poll() is None:
            process.kill()
        process.wait(timeout=30)


def _wait_ready(client: httpx.Client, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while client.get("/health/ready").status_code != 200:
        assert time.monotonic() < deadline, "not ready in time"
        time.sleep(0.05)


def test_real_process_serves_and_drains_on_sigterm(server):
    url, process, log_path = server
    with httpx.Client(base_url=url, timeout=60) as client:
        assert client.get("/health/live").status_code == 200
        _wait_ready(client)

        x = torch.randn(50, 128).half()
        j = client.post("/quantize", json={"vectors": b64(x), "variant": "full", "bits": 3})
        s = client.post(
            "/quantize",
            content=st_save({"vectors": x}, metadata={"variant": "full", "bits": "3"}),
            headers={"content-type": SAFETENSORS},
        )
        assert j.status_code == 200 and s.status_code == 200
        expected = Quantizer("full", 128, 3).quantize(x).codes.numpy().tobytes()
        assert unb64(j.json()["codes"]).numpy().tobytes() == expected == st_load(s.content)["codes"].numpy().tobytes()
        d = client.post("/dequantize", content=j.content, headers={"content-type": "application/json"})
        assert d.status_code == 200 and unb64(d.json()["vectors"]).shape == (50, 128)
        metrics = client.get("/metrics").text
        assert (
            'isoquant_kernel_duration_seconds_count{bits="3",dim="128",dtype="float16",op="quantize",variant="full"}'
            in metrics
            or 'op="quantize",variant="full",dim="128",bits="3",dtype="float16"' in metrics
        )

        # A long request in flight when SIGTERM arrives must still be answered in full.
        big = torch.randn(65536, 256).half()  # 32 MiB: under the default 64 MiB body limit
        result: dict = {}

        def long_request():
            with httpx.Client(base_url=url, timeout=120) as c:
                result["response"] = c.post(
                    "/quantize",
                    content=st_save(
                        {"vectors": big},
                        metadata={
                            "variant": "full",
                            "bits": "4",
                            "return_reconstruction": "true",
                            "return_distortion": "true",
                        },
                    ),
                    headers={"content-type": SAFETENSORS},
                )

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 30
        while "isoquant_jobs_running 1.0" not in client.get("/metrics").text:
            assert time.monotonic() < deadline and thread.is_alive(), (
                "the long request never reached the device",
                result.get("response"),
            )
            time.sleep(0.01)
        process.send_signal(signal.SIGTERM)
        # Draining: not ready, still alive.
        time.sleep(0.2)
        ready = client.get("/health/ready")
        assert ready.status_code == 503 and ready.json()["error"]["type"] == "shutting_down"
        assert client.get("/health/live").status_code == 200
        thread.join(120)
        response = result["response"]
        assert response.status_code == 200
        out = st_load(response.content)
        assert out["codes"].shape == (65536, 128) and out["reconstruction"].shape == (65536, 256)

    # Then the process exits on its own (uvicorn re-raises the signal after a graceful shutdown).
    assert process.wait(timeout=60) in (0, -signal.SIGTERM)
    log = log_path.read_text()
    assert "Traceback" not in log, log


def _counter(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in a text exposition (0 when absent)."""
    for line in metrics.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            sample_labels = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0])) if "{" in line else {}
            if all(sample_labels.get(k) == v for k, v in labels.items()):
                return float(line.rsplit(" ", 1)[1])
    return 0.0


# Two server processes with one small warm quantizer each.
TWO_PROCESSES = {
    "ISOQUANT_PROCESSES": "2",
    "ISOQUANT_WARM_VARIANTS": "full",
    "ISOQUANT_WARM_DIMS": "128",
    "ISOQUANT_WARM_BITS": "3",
    "ISOQUANT_WARM_DTYPES": "float16",
}


def test_several_processes_share_the_port_and_sum_their_metrics():
    """ISOQUANT_PROCESSES=2: both server processes serve one port and answer correctly; keep-alive
    connections go to them in turn (4 connections: 2 each); every
    /metrics scrape (whichever process answers it) counts the vectors of all requests; ready is 1 only
    when both are warm; SIGTERM stops both and the supervisor exits 0 and removes its metrics folder."""
    from tests.live_service import start_server

    server = start_server(TWO_PROCESSES)
    try:
        x = torch.randn(37, 128).half()
        expected = Quantizer("full", 128, 3).quantize(x).codes.numpy().tobytes()
        body = st_save({"vectors": x}, metadata={"variant": "full", "bits": "3"})
        requests = 12
        for _ in range(requests):  # a new connection each time, so that the kernel spreads them over both
            r = httpx.post(f"{server.url}/quantize", content=body, headers={"content-type": SAFETENSORS}, timeout=60)
            assert r.status_code == 200 and st_load(r.content)["codes"].numpy().tobytes() == expected
        for _ in range(6):
            text = server.metrics_text()
            assert _counter(text, "isoquant_vectors_total", op="quantize", variant="full", dim="128") == requests * 37
            assert _counter(text, "isoquant_ready") == 1.0
            # prometheus_client's process_* would describe one process: left out; isoquant_process_* sum them.
            assert not re.search(r"^process_cpu_seconds_total", text, re.M)
            assert _counter(text, "isoquant_process_cpu_seconds_total") > 0
            rss_sum = _counter(text, "isoquant_process_resident_memory_bytes")
        # Keep-alive connections are handed to the processes in turn, not left to a race between them.
        from bench.loadgen import connections_per_process

        port = int(server.url.rsplit(":", 1)[1])
        kept = [httpx.Client(base_url=server.url, timeout=60) for _ in range(4)]
        try:
            for client in kept:
                assert client.get("/health/live").status_code == 200
            assert connections_per_process(port, leave_out_own=False) == [2, 2]
        finally:
            for client in kept:
                client.close()
        log = server.log_text()
        assert log.count("Application startup complete") == 2, log
        metrics_dir = re.search(r"metrics in (\S+)", log)
        pids = [int(p) for p in re.search(r"started 2 server processes \(([\d, ]+)\)", log).group(1).split(", ")]
        page = os.sysconf("SC_PAGE_SIZE")
        rss = [int(open(f"/proc/{pid}/statm").read().split()[1]) * page for pid in pids]
        assert rss_sum > 1.5 * max(rss), (rss_sum, rss)  # both processes' memory, not one's
    finally:
        server.process.terminate()
        status = server.process.wait(timeout=60)
    assert status == 0, server.log_text()
    assert metrics_dir and not Path(metrics_dir.group(1)).exists()
    assert "Traceback" not in server.log_text()


def _gone(pid: int) -> bool:
    """The process has exited (no /proc entry, or a zombie nobody has reaped yet)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except FileNotFoundError:
        return True


def _dead_pid() -> int:
    """The pid of a process that has exited and been reaped."""
    child = subprocess.Popen(["true"])
    child.wait()
    return child.pid


def test_server_processes_exit_when_the_supervisor_is_killed(tmp_path):
    """SIGKILL of the supervisor (no chance to stop its children): the server processes see their
    connection pair close and shut down instead of living on, unreachable, with their device memory, and
    the last one out removes the metrics folder. Stale metrics folders of supervisors killed with their
    children are removed by the next start when every process they name is gone, and only then."""
    from tests.live_service import start_server

    dead, alive_pid = _dead_pid(), os.getpid()
    stale = tmp_path / f"isoquant-metrics-{dead}-old1"  # supervisor and server process gone
    stale.mkdir()
    (stale / f"counter_{_dead_pid()}.db").write_bytes(b"x")
    (stale / f"ready-{_dead_pid()}").write_bytes(b"")
    live_child = tmp_path / f"isoquant-metrics-{dead}-old2"  # supervisor gone, a process named in it lives
    live_child.mkdir()
    (live_child / f"gauge_livesum_{alive_pid}.db").write_bytes(b"x")
    live_parent = tmp_path / f"isoquant-metrics-{alive_pid}-old3"  # its supervisor lives
    live_parent.mkdir()
    server = start_server({**TWO_PROCESSES, "TMPDIR": str(tmp_path)})
    try:
        assert httpx.get(f"{server.url}/health/live", timeout=30).status_code == 200
        started = re.search(r"started 2 server processes \(([\d, ]+)\)", server.log_text())
        pids = [int(p) for p in started.group(1).split(", ")]
        metrics_dir = Path(re.search(r"metrics in (\S+)", server.log_text()).group(1))
        assert metrics_dir.parent == tmp_path and metrics_dir.name.startswith(f"isoquant-metrics-{server.process.pid}-")
        folders = sorted(p.name for p in tmp_path.iterdir() if p.name.startswith("isoquant-metrics-"))
        assert folders == sorted([live_child.name, live_parent.name, metrics_dir.name])  # the stale one is gone
    finally:
        server.process.kill()
        server.process.wait(timeout=30)
    deadline = time.monotonic() + 60
    while not all(_gone(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in pids if not _gone(pid)]
    for pid in alive:  # do not leave them behind if the test fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, server.log_text()
    assert not metrics_dir.exists(), sorted(os.listdir(metrics_dir))
    assert not stale.exists() and live_child.exists() and live_parent.exists()


def test_a_killed_server_process_is_replaced_while_the_other_serves():
    """kill -9 of one of 2 server processes: every request made meanwhile (a new connection each) is answered
    by the other, a replacement starts, becomes ready and takes connections; the supervisor keeps running."""
    from tests.live_service import start_server

    server = start_server(TWO_PROCESSES)
    try:
        body = st_save({"vectors": torch.randn(5, 128).half()}, metadata={"variant": "full", "bits": "3"})

        def post() -> int:
            headers = {"content-type": SAFETENSORS}
            return httpx.post(f"{server.url}/quantize", content=body, headers=headers, timeout=60).status_code

        assert post() == 200
        started = re.search(r"started 2 server processes \(([\d, ]+)\)", server.log_text())
        killed_at = time.monotonic()
        os.kill(int(started.group(1).split(", ")[0]), signal.SIGKILL)
        # A connection handed over in the instant the process dies is lost with it (in flight there); the
        # supervisor sees the death at once and from then on every request goes to the other process.
        while "exited with" not in server.log_text():
            assert time.monotonic() - killed_at < 5, server.log_text()
            time.sleep(0.05)
        statuses = []
        deadline = time.monotonic() + 60
        while "restarted server process" not in server.log_text() or len(statuses) < 20:
            statuses.append(post())
            assert time.monotonic() < deadline, server.log_text()
        assert statuses == [200] * len(statuses), statuses
        replacement = int(re.search(r"restarted server process \d+ as (\d+)", server.log_text()).group(1))
        deadline = time.monotonic() + 60  # ready, then offered connections
        while httpx.get(f"{server.url}/health/ready", timeout=30).status_code != 200:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.2)
        # /health/ready counts the replacement from its ready marker; the supervisor hands it connections from
        # its next look at the markers (every 0.2 s), which it logs. (CI once saw [4] here, in that gap.)
        while f"({replacement}) is ready and takes connections" not in server.log_text():
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.05)
        from bench.loadgen import connections_per_process

        port = int(server.url.rsplit(":", 1)[1])
        kept = [httpx.Client(base_url=server.url, timeout=60) for _ in range(4)]
        try:
            for client in kept:
                assert client.get("/health/live").status_code == 200
            assert connections_per_process(port, leave_out_own=False) == [2, 2]  # the replacement takes its share
        finally:
            for client in kept:
                client.close()
        assert not _gone(replacement) and server.process.poll() is None
    finally:
        server.process.terminate()
        status = server.process.wait(timeout=60)
    assert status == 0, server.log_text()


# docs/OPERATIONS.md, "Shutdown": after SIGTERM the process exits within drain + job timeout + this margin,
# plus the device work still running then (none here) and the time to stop: measured 0.15-0.25 s with one
# process and with the supervisor (which stops after its server processes and skips the interpreter's
# teardown: with it, 0.8-1.0 s), on a 2-core CPU.
SHUTDOWN_MARGIN_S = 2.0
STOP_S = {1: 1.0, 2: 1.0}


def _stopped_log(server) -> str:
    """A server's log once the test is done with it: killed first if it still runs, its log file removed."""
    if server.process.poll() is None:
        server.process.kill()
    log = server.log_text()
    server.log.unlink(missing_ok=True)
    return log


@pytest.mark.parametrize("processes", [1, 2])
def test_sigterm_to_exit_under_held_requests_matches_the_documented_bound(processes):
    """Two requests that would hold the shutdown: one whose large answer the client does not read, one whose
    body trickles in. The trickled one gets 503 shutting_down when the drain ends; the unread answer holds
    the process until drain + job timeout + 2 s, when it is cut; the process exits then, not uvicorn's 5 s
    later (before: 8.2 s for drain 1 s and job timeout 2 s, against 3 s documented)."""
    import socket

    from tests.live_service import SMALL_CPU_ENV, start_server

    drain, job_timeout = 1.0, 2.0
    server = start_server({
        **SMALL_CPU_ENV,
        "ISOQUANT_PROCESSES": str(processes),
        "ISOQUANT_DRAIN_SECONDS": str(drain),
        "ISOQUANT_JOB_TIMEOUT_S": str(job_timeout),
        "ISOQUANT_BODY_GRACE_S": "60",  # the trickler is not cut by the rate before shutdown
        "ISOQUANT_LOG_LEVEL": "info",
    })
    held = socket.create_connection(("127.0.0.1", server.port))
    trickler = socket.create_connection(("127.0.0.1", server.port))
    try:
        # ~11 MB of reconstruction back (more than the socket buffers take), into a client that never reads:
        # the server's writes block. Small enough for its device job to end well within the 2 s job timeout.
        held.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        body = st_save({"vectors": torch.randn(10000, 256)},
                       metadata={"variant": "full", "bits": "3", "return_reconstruction": "true"})
        held.sendall(b"POST /quantize HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                     % (SAFETENSORS.encode(), len(body)) + body)
        trickler.sendall(b"POST /quantize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                         b"Content-Length: 1000\r\n\r\n{")
        deadline = time.monotonic() + 60
        # Counted once the answer is encoded, just before it is written (and then blocks).
        while _counter(server.metrics_text(), "isoquant_payload_bytes_total", op="quantize", direction="out") == 0:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        time.sleep(0.5)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        trickler.settimeout(30)
        answer = trickler.recv(65536)
        answered = time.monotonic() - start
        status = server.process.wait(timeout=60)
        elapsed = time.monotonic() - start
    finally:
        held.close()
        trickler.close()
        log = _stopped_log(server)
    assert answer.startswith(b"HTTP/1.1 503 ") and b'"shutting_down"' in answer, answer
    assert drain - 0.2 < answered < drain + 1.0, answered
    bound = drain + job_timeout + SHUTDOWN_MARGIN_S
    print(f"{processes} process(es): SIGTERM to exit {elapsed:.2f} s (bound {bound:g} s + the stop), "
          f"the trickled body answered 503 after {answered:.2f} s")
    assert bound - 0.5 < elapsed < bound + STOP_S[processes], (elapsed, bound)
    assert status in (0, -signal.SIGTERM), log
    assert "Traceback" not in log, log


def _read_response(conn, rate: float | None = None) -> bytes:
    """One HTTP/1.1 response (headers and a content-length body) from a blocking socket; b"" if the server
    closed the connection first (a reset reads as b"" too). ``rate``: read at most that many bytes/s."""
    data, start, received = b"", time.monotonic(), 0

    def receive() -> bytes:
        nonlocal received
        if rate is not None:
            time.sleep(max(0.0, start + received / rate - time.monotonic()))
        chunk = conn.recv(65536)
        received += len(chunk)
        return chunk

    try:
        while b"\r\n\r\n" not in data:
            chunk = receive()
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
        while len(body) < length:
            chunk = receive()
            if not chunk:
                break
            body += chunk
    except ConnectionResetError:
        return data
    return head + b"\r\n\r\n" + body


@pytest.mark.parametrize("processes", [1, 2])
def test_a_request_racing_the_shutdown_on_a_keep_alive_connection_is_answered_503(processes):
    """At SIGTERM a client may have just sent its next request on a keep-alive connection that the server
    still sees idle (test_the_gpu_overlay_on_a_gpu saw it once: one of 519 requests cut, "Server
    disconnected without sending a response"). uvicorn closed every idle connection at once, under such a
    request; with the supervisor, a new connection was still accepted after its server processes had
    stopped taking any, then closed unanswered. Now a request whose head had begun to arrive, or that
    arrives on an idle connection within IDLE_CLOSE_S of the shutdown, is answered 503 shutting_down and
    the connection closes; the port refuses new connections, as a single uvicorn process's does."""
    import socket

    from service.http_protocol import IDLE_CLOSE_S
    from tests.live_service import SMALL_CPU_ENV, start_server

    server = start_server({**SMALL_CPU_ENV, "ISOQUANT_PROCESSES": str(processes), "ISOQUANT_DRAIN_SECONDS": "0",
                           "ISOQUANT_LOG_LEVEL": "info"})
    address = ("127.0.0.1", server.port)
    idle, begun = (socket.create_connection(address, timeout=10) for _ in range(2))
    try:
        for conn in (idle, begun):
            conn.sendall(b"GET /health/live HTTP/1.1\r\nHost: x\r\n\r\n")
            assert _read_response(conn).startswith(b"HTTP/1.1 200 ")
        begun.sendall(b"POST /quantize HTTP/1.1\r\nHost: x\r\n")  # the next request's head, begun
        time.sleep(0.2)
        start = time.monotonic()
        server.process.send_signal(signal.SIGTERM)
        while server.log_text().count("Shutting down") < processes:
            assert time.monotonic() - start < 10, server.log_text()
            time.sleep(0.01)
        time.sleep(0.1)  # the line is logged just before the connections are told
        assert time.monotonic() - start < IDLE_CLOSE_S - 0.3, "too late to test the idle connection"
        idle.sendall(b"POST /quantize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        answers = {"idle": _read_response(idle), "begun": _read_response(begun)}
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(address, timeout=10).close()
        status = server.process.wait(timeout=30)
        elapsed = time.monotonic() - start
    finally:
        idle.close()
        begun.close()
        log = _stopped_log(server)
    for name, answer in answers.items():
        assert answer.startswith(b"HTTP/1.1 503 ") and b'"shutting_down"' in answer, (name, answer, log[-3000:])
        assert b"connection: close" in answer.lower(), (name, answer)
    assert status in (0, -signal.SIGTERM), log
    assert "Traceback" not in log, log
    assert elapsed < IDLE_CLOSE_S + STOP_S[processes] + 1.0, elapsed


@pytest.mark.parametrize("processes,read_rate", [(1, None), (2, None), (1, 2e6)])
def test_a_request_sent_right_after_an_answer_written_across_the_shutdown_is_answered_503(processes, read_rate):
    """An answer being written when the shutdown begins went out with a keep-alive head, and uvicorn closed the
    connection right after its last byte: a client that read it and sent its next request at once met a closed
    connection (nothing answered its POST). Now the connection is idle at shutdown once the client has the
    answer: the next request gets 503 shutting_down with connection: close. ``read_rate`` (bytes/s): a client
    that takes ~5 s to read the 10 MB answer, past IDLE_CLOSE_S after its last part was handed to the socket
    (the review's case: the window must not run out before the client has the answer)."""
    import socket

    from tests.live_service import SMALL_CPU_ENV, start_server

    server = start_server({**SMALL_CPU_ENV, "ISOQUANT_PROCESSES": str(processes), "ISOQUANT_DRAIN_SECONDS": "0",
                           "ISOQUANT_LOG_LEVEL": "info"})
    conn = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    try:
        # 10 MB of codes, then the norms, back into a client that does not read yet: the codes fill the socket
        # buffers and the transport's, so the norms wait for the client and the answer is still being written
        # (an answer whose last part is buffered whole is complete for uvicorn). No small SO_RCVBUF: it would
        # slow the read below to ~40 KB/s.
        body = st_save({"vectors": torch.randn(10000, 1024).half()}, metadata={"variant": "full", "bits": "8"})
        conn.sendall(b"POST /quantize HTTP/1.1\r\nHost: x\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n"
                     % (SAFETENSORS.encode(), len(body)) + body)
        deadline = time.monotonic() + 60
        while _counter(server.metrics_text(), "isoquant_payload_bytes_total", op="quantize", direction="out") == 0:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.1)
        time.sleep(0.3)
        server.process.send_signal(signal.SIGTERM)
        while server.log_text().count("Shutting down") < processes:
            assert time.monotonic() < deadline, server.log_text()
            time.sleep(0.01)
        time.sleep(0.1)  # the line is logged just before the connections are told
        answer = _read_response(conn, read_rate)
        conn.sendall(b"POST /quantize HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 2\r\n\r\n{}")
        after = _read_response(conn)
        status = server.process.wait(timeout=60)
    finally:
        conn.close()
        log = _stopped_log(server)
    head = answer.partition(b"\r\n\r\n")[0]
    assert head.startswith(b"HTTP/1.1 200 ") and b"connection: close" not in head.lower(), head
    assert after.startswith(b"HTTP/1.1 503 ") and b'"shutting_down"' in after, (after, log[-3000:])
    assert b"connection: close" in after.lower(), after
    assert status in (0, -signal.SIGTERM), log
    assert "Traceback" not in log, log


@pytest.mark.parametrize("processes", [1, 2])
def test_sigint_ends_the_service_as_interrupted_without_a_traceback(processes):
    """Ctrl-C (SIGINT) to the service's process: the graceful shutdown runs and the process ends as
    interrupted (one process: killed by SIGINT, as the shell expects of Ctrl-C; the supervisor, which stops
    its server processes with SIGTERM: 0) with no traceback. uvicorn raises the SIGINT it handled again at
    the end, which Python turned into a KeyboardInterrupt and its traceback."""
    from tests.live_service import SMALL_CPU_ENV, start_server

    server = start_server({**SMALL_CPU_ENV, "ISOQUANT_PROCESSES": str(processes), "ISOQUANT_LOG_LEVEL": "info"})
    try:
        assert httpx.get(f"{server.url}/health/live", timeout=10).status_code == 200
        server.process.send_signal(signal.SIGINT)
        status = server.process.wait(timeout=30)
    finally:
        log = _stopped_log(server)
    assert "Shutting down" in log, log
    assert "Traceback" not in log and "KeyboardInterrupt" not in log, log
    # A child keeps an ignored SIGINT (a shell's background job, as CI may run us): uvicorn still handles it,
    # then raises it again into the ignored disposition, and the process ends with 0.
    inherited_ignore = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    assert status == (-signal.SIGINT if processes == 1 and not inherited_ignore else 0), (status, log)
