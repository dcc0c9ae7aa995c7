"""Soak test (slow): 200 streaming clients that stop reading and drop at random points, plus 1,000 idle
sockets, against ``lmforge serve`` in its own process with a 1,024-descriptor limit. ``/health`` must answer
within 1 s throughout, and the server's free slots, descriptors and memory must come back afterwards."""

from __future__ import annotations

import json
import os
import random
import resource
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from support.serve import make_checkpoint  # noqa: E402

pytestmark = pytest.mark.slow

STREAMS = 200
IDLE = 1000
SLOTS = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _limit_fds() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def _get(port: int, path: str, timeout: float) -> tuple[int, bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    status = int(data.split(b" ", 2)[1])
    return status, data.split(b"\r\n\r\n", 1)[1]


def _post(port: int, body: dict, timeout: float = 30) -> int:
    raw = json.dumps(body).encode()
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(raw)}\r\nConnection: close\r\n\r\n".encode()
            + raw
        )
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    return int(data.split(b" ", 2)[1])


def _dropping_stream(port: int, rng: random.Random) -> None:
    """Ask for a long stream, read a few chunks, stop reading for a while, then vanish."""
    body = json.dumps({"model": "m", "prompt": "hello", "max_tokens": 2048, "stream": True}).encode()
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
            + f"Content-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        for _ in range(rng.randint(0, 3)):
            s.recv(256)
        time.sleep(rng.uniform(0.0, 1.5))  # a reader that stalls before it disconnects
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")  # RST on close
        s.close()
    except OSError:
        pass


def _server_stats(pid: int) -> tuple[int, int]:
    fds = len(os.listdir(f"/proc/{pid}/fd"))
    rss = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            rss = int(line.split()[1]) * 1024
    return fds, rss


def _slots_free(port: int) -> bool:
    """All slots free: SLOTS simultaneous short requests all succeed (none gets 429)."""
    out: list[int] = []
    threads = [
        threading.Thread(target=lambda: out.append(_post(port, {"model": "m", "prompt": "a", "max_tokens": 2})))
        for _ in range(SLOTS)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out == [200] * SLOTS


def test_soak_dropped_streams_and_idle_sockets(tmp_path: Path) -> None:
    ckpt = make_checkpoint(tmp_path / "ckpt")
    port = _free_port()
    log = open(tmp_path / "server.log", "wb")  # noqa: SIM115
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lmforge",
            "serve",
            str(ckpt),
            "--port",
            str(port),
            "--model-name",
            "m",
            "--max-concurrency",
            str(SLOTS),
            "--log-level",
            "warning",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        preexec_fn=_limit_fds,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    idle: list[socket.socket] = []
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                if _get(port, "/health", 2)[0] == 200:
                    break
            except OSError:
                pass
            assert time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        assert _slots_free(port)
        time.sleep(1)
        fds0, rss0 = _server_stats(proc.pid)

        worst = 0.0
        stop = threading.Event()
        failures: list[str] = []

        def probe() -> None:
            nonlocal worst
            while not stop.is_set():
                t0 = time.monotonic()
                try:
                    status, _ = _get(port, "/health", 5)
                    if status != 200:
                        failures.append(f"/health {status}")
                except OSError as err:
                    failures.append(f"/health: {err}")
                worst = max(worst, time.monotonic() - t0)
                time.sleep(0.1)

        prober = threading.Thread(target=probe)
        prober.start()
        for _ in range(IDLE):
            try:
                idle.append(socket.create_connection(("127.0.0.1", port), timeout=5))
            except OSError as err:
                failures.append(f"idle connect: {err}")
                break
        rng = random.Random(0)
        clients = [
            threading.Thread(target=_dropping_stream, args=(port, random.Random(rng.random()))) for _ in range(STREAMS)
        ]
        for i, t in enumerate(clients):
            t.start()
            if i % 20 == 19:
                time.sleep(0.2)
        for t in clients:
            t.join()
        for s in idle:
            s.close()
        idle.clear()
        # the server must let go of everything within a bounded time
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            fds, rss = _server_stats(proc.pid)
            if fds <= fds0 + 2 and _slots_free(port):
                break
            time.sleep(1)
        stop.set()
        prober.join()
        fds, rss = _server_stats(proc.pid)
        log_size = (tmp_path / "server.log").stat().st_size
        print(
            f"SOAK health_worst_s={worst:.2f} health_failures={len(failures)} fds {fds0}->{fds} "
            f"rss_mb {rss0 / 1e6:.0f}->{rss / 1e6:.0f} log_bytes={log_size}"
        )
        assert not failures, failures[:5]
        assert worst < 1.0, f"/health took {worst:.2f} s at worst"
        assert fds <= fds0 + 2, f"descriptors {fds0} -> {fds}"
        assert _slots_free(port)
        assert rss < rss0 * 1.5 + 50e6, f"memory {rss0 / 1e6:.0f} MB -> {rss / 1e6:.0f} MB"
        assert log_size < 200_000, f"the server wrote {log_size} bytes of log"
    finally:
        for s in idle:
            s.close()
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
