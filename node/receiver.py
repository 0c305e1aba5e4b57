"""One receiver process of a node: C-STORE (and C-ECHO, MPPS) accepted from the listening socket
the node bound and handed down to all its receivers, with the node's own SCP code.

Started by the node (``node.receivers``) as ``python -P -m node.receiver SPEC SLOT FD``. Every
guarantee of the in-process SCP holds here, because it is the same code: success only after the
file is fsynced and renamed, its folders fsynced and its index row committed (this process's own
group commit; the receivers take turns at the SQLite index, ``WriterTurns``); re-sends
de-duplicated by the store's link(2), also between receivers; our own results recognised through
the index; TLS from the same settings. The association limits
are counted over all receivers (:mod:`node.association_slots`), the metrics summed by the node
(prometheus_client's multiprocess files). The process dies with the node: the kernel sends it
SIGKILL when its parent exits (``PR_SET_PDEATHSIG``), and it checks its parent at every poll too.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
from pathlib import Path
from types import FrameType

from pydantic import BaseModel, ConfigDict

from config.settings import LoggingSettings, NodeSettings

PR_SET_PDEATHSIG = 1
PARENT_POLL_S = 0.5
# What pydicom imports when it is installed, and a receiver never uses: numpy with pydicom's pixel
# decoders, GDCM, requests (pydicom's test-data download). Together 37 MB of each receiver's
# memory. Marked absent (None in sys.modules: their import fails as if not installed, which
# pydicom is written for) before anything imports pydicom.
NOT_IN_RECEIVERS = ("numpy", "gdcm", "requests")


class ReceiverSpec(BaseModel):
    """What the node tells its receivers (a JSON file in its run folder)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    node: NodeSettings
    logging: LoggingSettings
    receivers: int
    slots: Path
    metrics: Path
    parent_pid: int


def ready_file(run_dir: Path, slot: int) -> Path:
    return run_dir / f"receiver-{slot}.ready"


def is_ready(run_dir: Path, slot: int, pid: int) -> bool:
    """Whether receiver ``slot`` running as ``pid`` listens (it writes its pid once it does)."""
    try:
        return ready_file(run_dir, slot).read_text() == str(pid)
    except OSError:
        return False


def die_with_parent(parent_pid: int) -> None:
    """SIGKILL from the kernel when the parent exits (Linux), and exit now if it already has."""
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    if os.getppid() != parent_pid:
        os._exit(1)


def serve(spec: ReceiverSpec, slot: int, listening_fd: int) -> None:
    """Receive until SIGTERM (or the parent is gone)."""
    # Imported here: prometheus_client reads PROMETHEUS_MULTIPROC_DIR when it is first imported.
    from node.association_slots import AssociationSlots
    from node.index import StudyIndex
    from node.ingest import IngestWriter
    from node.logs import configure_logging
    from node.metrics import ReceiverMetrics
    from node.scp import StorageSCP, receiver_server, start_scp
    from node.store import StudyStore

    configure_logging(spec.logging)
    store = StudyStore(spec.node.store_path)
    index = StudyIndex(spec.node.index_path)
    writer = IngestWriter(index)
    scp = StorageSCP(spec.node, store, index, writer, ReceiverMetrics(None))
    slots = AssociationSlots(spec.slots, spec.receivers, slot)
    scp.node_wide_connections = slots.connections
    server = start_scp(spec.node, scp, receiver_server(slots, listening_fd))
    ready_file(spec.slots.parent, slot).write_text(str(os.getpid()))
    stop = threading.Event()

    def on_signal(signum: int, frame: FrameType | None) -> None:
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    while not stop.wait(PARENT_POLL_S):
        if os.getppid() != spec.parent_pid:
            break
    server.shutdown()


def leave_out_unused_modules() -> None:
    for name in NOT_IN_RECEIVERS:
        if name not in sys.modules:  # one already imported costs nothing more
            sys.modules[name] = None  # type: ignore[assignment]  # the import system's "not installed"


def main(argv: list[str]) -> int:
    leave_out_unused_modules()
    spec = ReceiverSpec.model_validate_json(Path(argv[0]).read_bytes())
    die_with_parent(spec.parent_pid)
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(spec.metrics)
    serve(spec, int(argv[1]), int(argv[2]))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
