"""Shared fixtures: a real node in-process on a free loopback port, real Redis, real files."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from config.settings import Settings, load_settings
from node.service import Node

PYDICOM_TEST_FILES = Path(__import__("pydicom").__file__).parent / "data" / "test_files"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_until(predicate: Callable[[], bool], timeout: float = 20.0, interval: float = 0.1) -> bool:
    """Poll ``predicate`` until it is true or ``timeout`` passes; returns its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


def make_settings(tmp_path: Path, **sections: Any) -> Settings:
    """Shipped defaults, with a private data folder, free ports and the given section overrides
    (a mapping is merged into the section, a list such as ``destinations`` replaces it)."""
    base: dict[str, Any] = {
        # Two receiver processes, the shipped default on a 2-core machine, whatever the machine.
        "node": {"data_dir": tmp_path / "data", "host": "127.0.0.1", "port": free_port(),
                 "quiet_period_s": 1.0, "min_free_disk_mb": 1, "receivers": 2},
        "http": {"port": free_port()},
        "workers": {"embedded": False, "models_dir": tmp_path / "models"},
        "logging": {"json": False, "level": "WARNING"},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values} if isinstance(values, dict) else values
    return load_settings(None, **base)


@pytest.fixture
def start_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    """Start nodes in this process; all are stopped at teardown."""
    nodes: list[Node] = []

    def _start(settings: Settings | None = None, **sections: dict[str, Any]) -> Node:
        node = Node(settings or make_settings(tmp_path, **sections), with_worker=False)
        node.start()
        nodes.append(node)
        return node

    yield _start
    for node in nodes:
        node.stop()


@pytest.fixture(scope="session")
def redis_url() -> str:
    """The machine's Redis (database 15, flushed per test that asks for ``clean_redis``)."""
    client = redis.Redis(host="127.0.0.1", port=6379, socket_connect_timeout=2)
    try:
        client.ping()
    except redis.ConnectionError:
        pytest.fail("Redis on 127.0.0.1:6379 does not answer; .ci/run starts it")
    return "redis://127.0.0.1:6379/15"


@pytest.fixture
def clean_redis(redis_url: str) -> str:
    redis.Redis.from_url(redis_url).flushdb()
    return redis_url


class PrivateRedis:
    """A redis-server of the test's own on another port, which the test may stop and restart."""

    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        self.folder = folder
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        binary = shutil.which("redis-server")
        assert binary, "redis-server is not installed"
        self.process = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "yes",
             "--appendfsync", "always", "--dir", str(self.folder)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(host="127.0.0.1", port=self.port, socket_connect_timeout=0.5)
        assert wait_until(lambda: _pings(client), timeout=10), "private redis-server did not start"

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait(timeout=10)
            self.process = None


def _pings(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.ConnectionError:
        return False


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
