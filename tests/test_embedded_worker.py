"""The embedded worker that ``pacsnode serve`` supervises: a worker that cannot start is reported
with its own words in the node's log, ``/health`` (503), ``pacsnode status`` and to the demo.

The realistic way a worker fails while its node runs: the ingest host lacks the GPU stack (no
``ml`` extra). The tests get that by putting a ``torch`` that cannot be imported first on the
children's ``PYTHONPATH``: the node never imports torch, its worker does.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import dicom_factory as f
from conftest import free_port, make_settings, wait_until
from lifecycle_support import run_cli, stop_process

from node.child_process import pacsnode_command
from node.embedded_worker import failure_reason, read_worker_health
from node.send import SendReport, scan, send_files
from node.service import Node
from workers.demo import GIVE_UP_AFTER_FAILURES, wait_for_results

BLOCKED = "No module named 'torch' (blocked by the test)"


def _block_torch(folder: Path) -> str:
    package = folder / "blocker" / "torch"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text(f"raise ImportError({BLOCKED!r})\n")
    return str(folder / "blocker")


def _health(port: int) -> tuple[int, dict[str, object]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as refused:
        return refused.code, json.loads(refused.read())


def test_a_worker_that_cannot_start_is_reported_in_health_status_and_the_log(tmp_path: Path) -> None:
    http_port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    env.update({"PYTHONPATH": _block_torch(tmp_path), "PACSNODE_NODE__DATA_DIR": str(tmp_path / "data"),
                "PACSNODE_NODE__PORT": str(free_port()), "PACSNODE_NODE__HOST": "127.0.0.1",
                "PACSNODE_HTTP__PORT": str(http_port), "PACSNODE_LOGGING__JSON": "false",
                "PACSNODE_WORKERS__MODELS_DIR": str(tmp_path / "models")})
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        node = subprocess.Popen(pacsnode_command("serve"), env=env, stdout=out, stderr=subprocess.STDOUT,
                                cwd=tmp_path)
    try:
        def failing() -> bool:
            try:
                status, body = _health(http_port)
            except OSError:
                return False  # not listening yet
            return status == 503 and "embedded worker failing" in json.dumps(body)

        assert wait_until(failing, timeout=60), log.read_text()[-3000:]
        status, body = _health(http_port)
        assert status == 503
        worker = body["embedded_worker"]
        assert isinstance(worker, dict)
        assert BLOCKED in str(worker["summary"]) and "'pacsnode worker' is not available here" in str(worker["summary"])

        shown = run_cli("status", env={**env, "PYTHONPATH": ""})
        assert shown.returncode == 0, shown.stderr
        assert "embedded worker failing: 'pacsnode worker' is not available here" in shown.stdout
        assert BLOCKED in shown.stdout

        written = log.read_text()
        assert "embedded worker exited; restarting" in written and BLOCKED in written  # its own words
    finally:
        stop_process(node)
    assert read_worker_health(tmp_path / "data") is None, "a stopped node still reports a worker"


def test_serve_warns_about_a_configuration_that_does_nothing(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("routing:\n  rules: []\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PACSNODE_")}
    env.update({"PACSNODE_NODE__DATA_DIR": str(tmp_path / "data"), "PACSNODE_NODE__PORT": str(free_port()),
                "PACSNODE_HTTP__ENABLED": "false", "PACSNODE_LOGGING__JSON": "false"})
    log = tmp_path / "node.log"
    with log.open("wb") as out:
        node = subprocess.Popen(pacsnode_command("serve", "--no-worker", "--config", str(site)), env=env,
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        assert wait_until(lambda: "node started" in log.read_text(), timeout=30), log.read_text()
    finally:
        stop_process(node)
    written = log.read_text()
    assert "no routing rules" in written and "no destinations" in written


def test_the_demo_stops_waiting_when_the_worker_keeps_failing(tmp_path: Path, monkeypatch) -> None:  # type: ignore[no-untyped-def]
    monkeypatch.setenv("PYTHONPATH", _block_torch(tmp_path))
    settings = make_settings(tmp_path, workers={"embedded": True, "models_dir": tmp_path / "models",
                                                "embedded_log": tmp_path / "worker.log"})
    node = Node(settings, with_worker=True)
    node.start()
    try:
        study = f.cxr()
        f.write(study, tmp_path / "incoming")
        sent = send_files(scan([tmp_path / "incoming"], SendReport()), "127.0.0.1", node.dicom_port,
                          settings.node.ae_title)
        assert sent.sent == 1
        started = time.monotonic()
        reason = wait_for_results(node, [str(study[0].StudyInstanceUID)], timeout_s=240)
        took = time.monotonic() - started
    finally:
        node.stop()
    assert reason is not None and reason.startswith("embedded worker failing:") and BLOCKED in reason
    assert took < 60, f"the demo waited {took:.0f} s for a worker that never came up"
    assert node.worker is not None and node.worker.health().failures >= GIVE_UP_AFTER_FAILURES


def test_the_reason_is_the_last_line_with_words_without_its_box() -> None:
    typer_error = ["Usage: pacsnode worker [OPTIONS]", "Try 'pacsnode worker -h' for help.",
                   "╭─ Error ─────────────────────╮", "│ No such option: --name      │",
                   "╰─────────────────────────────╯", ""]
    assert failure_reason(typer_error, 2) == "No such option: --name (exit code 2)"
    assert failure_reason([], -9) == "no output (killed by signal 9)"


def test_process_pools_started_from_a_folder_named_like_our_packages(tmp_path: Path) -> None:
    """``pacsnode pretrain index --workers 2`` spawns header readers; run from a folder whose
    subfolders are named like our modules, every one of them still imports our code."""
    from node.synth import generate

    generate(tmp_path / "archive", studies=2, kinds="cxr", seed=1, cxr_size=64)
    for shadow in ("pretrain/index", "node/headers", "config/settings"):
        (tmp_path / shadow).mkdir(parents=True)
    pacsnode = Path(sys.executable).with_name("pacsnode")  # the console script, as a user runs it
    done = subprocess.run([str(pacsnode), "pretrain", "index", "--archive", "archive", "--out", "index.sqlite",
                           "--workers", "2"], cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "2 image frame(s)" in done.stdout
