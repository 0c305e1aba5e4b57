"""The three C-STORE receivers compared: pacsnode, DCMTK storescp and Orthanc.

Each one is started as a subprocess on free loopback ports with its own fresh storage folder,
waited for until it answers a C-ECHO, asked afterwards how many instances it holds, and
stopped. ``TCP_NODELAY=1`` is in the environment of every DCMTK-based process (storescp,
Orthanc, the senders): DCMTK otherwise leaves Nagle on, and every transfer pays ~40 ms.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from abc import ABC, abstractmethod
from pathlib import Path
from typing import IO

from node.child_process import pacsnode_command

HOST = "127.0.0.1"
START_TIMEOUT_S = 60.0
STOP_TIMEOUT_S = 30.0
CALLING_AE = "BENCHSCU"
PEER_MAX_PDU = 131072  # the largest receive PDU storescp and Orthanc accept (their default: 16 KiB)
DCMTK_BIN = Path("/usr/bin")  # the venv has pynetdicom's own storescu/storescp/echoscu: never those


def dcmtk(tool: str) -> str:
    """Absolute path of a DCMTK tool (not pynetdicom's same-named scripts in the venv)."""
    path = DCMTK_BIN / tool
    if not path.exists():
        raise FileNotFoundError(f"DCMTK {tool} not found at {path} (apt-get install dcmtk)")
    return str(path)


def dcmtk_env() -> dict[str, str]:
    """The environment for DCMTK processes: Nagle off."""
    return {**os.environ, "TCP_NODELAY": "1"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants, from /proc (a node's receiver processes are its children)."""
    found, queue = [], [pid]
    while queue:
        current = queue.pop()
        found.append(current)
        for task in Path(f"/proc/{current}/task").glob("*"):
            try:
                queue += [int(child) for child in (task / "children").read_text().split()]
            except (OSError, ValueError):
                continue
    return found


def peak_rss_bytes(pid: int) -> int | None:
    """VmHWM (peak resident set) of a live process, from /proc; None when not readable."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a live process and its waited-for children, from /proc."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    ticks = sum(int(v) for v in fields[11:15])  # utime, stime, cutime, cstime (fields 14-17)
    return ticks / os.sysconf("SC_CLK_TCK")


def echo_ok(port: int, called_ae: str) -> bool:
    """One DCMTK C-ECHO against the receiver."""
    done = subprocess.run([dcmtk("echoscu"), "-aet", CALLING_AE, "-aec", called_ae, "-to", "2", "-ta", "5",
                           HOST, str(port)], env=dcmtk_env(), capture_output=True, check=False)
    return done.returncode == 0


class Receiver(ABC):
    """A C-STORE receiver under test, with its own storage folder below ``workdir``."""

    name: str = ""
    ae_title: str = ""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.log_path = workdir / f"{self.name}.log"
        self._log: IO[bytes] | None = None

    @abstractmethod
    def command(self) -> list[str]:
        """The command line that runs the receiver."""

    def environment(self) -> dict[str, str]:
        return dcmtk_env()

    def prepare(self) -> None:
        """Create folders and configuration before the process starts."""

    def wait_ready(self) -> None:
        """Block until the receiver answers a C-ECHO; raise if it exits or times out."""
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            if echo_ok(self.port, self.ae_title):
                return
            time.sleep(0.2)
        raise RuntimeError(f"{self.name} did not answer C-ECHO within {START_TIMEOUT_S:.0f} s; "
                           f"see {self.log_path}")

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.prepare()
        self._log = self.log_path.open("wb")
        self.process = subprocess.Popen(self.command(), env=self.environment(), stdout=self._log,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready()

    def _check_alive(self) -> None:
        if self.process is not None and self.process.poll() is not None:
            raise RuntimeError(f"{self.name} exited with {self.process.returncode}; see {self.log_path}:\n"
                               + self.log_tail())

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def peak_rss(self) -> int | None:
        """Peak resident set summed over the receiver's process tree."""
        if self.process is None:
            return None
        peaks = [peak_rss_bytes(pid) for pid in process_tree(self.pid)]
        return sum(p for p in peaks if p is not None) or None

    def cpu_seconds(self) -> float | None:
        """CPU seconds of the receiver's whole process tree (a node's receivers included)."""
        if self.process is None:
            return None
        used = [cpu_seconds(pid) for pid in process_tree(self.pid)]
        return sum(u for u in used if u is not None) if used[0] is not None else None

    @abstractmethod
    def stored_count(self) -> int:
        """How many instances the receiver holds now."""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after ``STOP_TIMEOUT_S``; closes the log."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        if self._log is not None:
            self._log.close()
            self._log = None

    def describe(self) -> dict[str, object]:
        """Settings worth recording with the results."""
        return {"command": self.command()}


def _count_files(folder: Path, suffix: str | None = None) -> int:
    """Regular files below ``folder``, skipping dot-folders (temp/quarantine areas)."""
    count = 0
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        count += sum(1 for f in files if suffix is None or f.endswith(suffix))
    return count


class PacsnodeReceiver(Receiver):
    """``pacsnode serve --no-worker``, HTTP off, WARNING logs, a private data folder; ``receivers``
    processes (None: the shipped default, one per core)."""

    name = "pacsnode"
    ae_title = "PACSNODE"

    def __init__(self, workdir: Path, extra_env: dict[str, str] | None = None, receivers: int | None = None) -> None:
        super().__init__(workdir)
        self.data_dir = workdir / "data"
        self.extra_env = dict(extra_env or {})
        if receivers is not None:
            self.extra_env["PACSNODE_NODE__RECEIVERS"] = str(receivers)

    def command(self) -> list[str]:
        return pacsnode_command("serve", "--port", str(self.port), "--ae-title", self.ae_title, "--no-worker")

    def environment(self) -> dict[str, str]:
        return {
            **dcmtk_env(),
            "PACSNODE_NODE__DATA_DIR": str(self.data_dir),
            "PACSNODE_NODE__HOST": HOST,
            "PACSNODE_HTTP__ENABLED": "false",
            "PACSNODE_LOGGING__LEVEL": "WARNING",
            "PACSNODE_WORKERS__EMBEDDED": "false",
            **self.extra_env,
        }

    def stored_count(self) -> int:
        return _count_files(self.data_dir / "store", ".dcm")

    def describe(self) -> dict[str, object]:
        env = self.environment()
        return {"command": self.command(), "env": {k: v for k, v in env.items() if k.startswith("PACSNODE_")}}


class StorescpReceiver(Receiver):
    """DCMTK ``storescp``: bit-preserving writes to a folder, no fsync, largest PDU it accepts."""

    name = "storescp"
    ae_title = "STORESCP"

    def __init__(self, workdir: Path, fork: bool = False) -> None:
        super().__init__(workdir)
        self.out_dir = workdir / "out"
        self.fork = fork

    def prepare(self) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)

    def command(self) -> list[str]:
        mode = ["--fork"] if self.fork else ["--single-process"]
        return [dcmtk("storescp"), *mode, "-aet", self.ae_title, "-od", str(self.out_dir), "+B", "-dhl",
                "-pdu", str(PEER_MAX_PDU), str(self.port)]

    def stored_count(self) -> int:
        return _count_files(self.out_dir)


class OrthancReceiver(Receiver):
    """Orthanc with its own JSON configuration: fresh storage, no compression, fsync on (default)."""

    name = "orthanc"
    ae_title = "ORTHANC"

    def __init__(self, workdir: Path) -> None:
        super().__init__(workdir)
        self.http_port = free_port()
        self.config_path = workdir / "orthanc.json"

    def configuration(self) -> dict[str, object]:
        storage = self.workdir / "storage"
        return {
            "Name": "bench",
            "StorageDirectory": str(storage),
            "IndexDirectory": str(storage),
            "StorageCompression": False,
            "Plugins": [],
            "HttpServerEnabled": True,
            "HttpPort": self.http_port,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomServerEnabled": True,
            "DicomAet": self.ae_title,
            "DicomPort": self.port,
            "DicomCheckCalledAet": False,
            "DicomAlwaysAllowStore": True,
            "DicomAlwaysAllowEcho": True,
            "UnknownSopClassAccepted": True,
            "MaximumPduLength": PEER_MAX_PDU,
            "SaveJobs": False,
            # SyncStorageArea stays at its default (true since Orthanc 1.7.4): it fsyncs each file.
        }

    def prepare(self) -> None:
        self.config_path.write_text(json.dumps(self.configuration(), indent=2))

    def command(self) -> list[str]:
        return ["Orthanc", str(self.config_path)]

    def _get(self, path: str) -> dict[str, object]:
        with urllib.request.urlopen(f"http://{HOST}:{self.http_port}{path}", timeout=10) as response:
            data = json.loads(response.read())
        assert isinstance(data, dict)
        return data

    def wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                self._get("/system")
                break
            except (urllib.error.URLError, OSError, ValueError):
                time.sleep(0.2)
        else:
            raise RuntimeError(f"Orthanc /system did not answer within {START_TIMEOUT_S:.0f} s; "
                               f"see {self.log_path}")
        super().wait_ready()

    def stored_count(self) -> int:
        count = self._get("/statistics").get("CountInstances", 0)
        assert isinstance(count, int)
        return count

    def describe(self) -> dict[str, object]:
        return {"command": self.command(), "config": self.configuration()}
