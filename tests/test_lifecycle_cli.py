"""The operator's verbs as subprocesses: ``pacsnode send`` into a running node, ``pacsnode status``
reading its index, and clear usage errors for a bad destination."""

from __future__ import annotations

import re
import socket
from pathlib import Path

import dicom_factory as f
import pytest
from conftest import make_settings, wait_until
from lifecycle_support import cli_env, run_cli, state_of


def cli_env_for(tmp_path: Path) -> dict[str, str]:
    return cli_env(make_settings(tmp_path))


def test_send_a_folder_then_status_lists_the_studies_with_their_states(
    start_node, clean_redis: str, tmp_path: Path
) -> None:
    node = start_node(broker={"url": clean_redis})
    folder = tmp_path / "outgoing"
    head, chest, spine = f.ct_head(8), f.cxr(), f.cxr(body_part="SPINE")
    f.write(head, folder / "head")
    f.write(chest + spine, folder / "xr")
    (folder / "README.txt").write_text("not DICOM\n")
    env = cli_env(node.settings)

    sent = run_cli("send", str(folder), "--to", f"127.0.0.1:{node.dicom_port}", env=env)
    assert sent.returncode == 0, sent.stderr
    assert "sent 10, failed 0, skipped 1" in sent.stdout
    assert "README.txt: not a DICOM file" in sent.stderr
    uids = {"head": head[0].StudyInstanceUID, "chest": chest[0].StudyInstanceUID,
            "spine": spine[0].StudyInstanceUID}
    expected = {"head": "queued", "chest": "queued", "spine": "unmatched"}
    assert wait_until(lambda: all(state_of(node.index, uids[k]) == v for k, v in expected.items()), timeout=10)

    status = run_cli("status", env=env)  # stdout is a pipe here, as in a script
    assert status.returncode == 0, status.stderr
    assert "Studies by state: queued=2, unmatched=1" in status.stdout
    lines = status.stdout.splitlines()
    for name, uid in uids.items():
        (line,) = [line for line in lines if uid in line]  # the whole UID, on one line
        assert re.search(rf"│ 1 +│ {expected[name]} ", line), line
    (head_line,) = [line for line in lines if uids["head"] in line]
    assert "ct-hemorrhage:queued" in head_line and "│ 8 " in head_line
    (spine_line,) = [line for line in lines if uids["spine"] in line]
    assert "no routing rule matched" in spine_line

    only = run_cli("status", "--state", "unmatched", env=env)
    assert uids["spine"] in only.stdout and uids["head"] not in only.stdout


@pytest.mark.parametrize("to", ["127.0.0.1", "127.0.0.1:", ":11112", "127.0.0.1:port", "127.0.0.1:99999",
                                "127.0.0.1:0", "no-such-host.invalid:104"])
def test_send_with_a_bad_destination_is_a_usage_error(to: str, tmp_path: Path) -> None:
    f.write(f.cxr(), tmp_path / "one")
    result = run_cli("send", str(tmp_path / "one"), "--to", to, env=cli_env_for(tmp_path))
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert "Invalid value for --to" in result.stderr
    assert "Traceback" not in result.stderr and "sent " not in result.stdout


@pytest.mark.parametrize("verb", [["status"], ["purge", "--dry-run"], ["purge"]], ids=" ".join)
def test_status_and_purge_without_an_index_say_so_and_create_nothing(verb: list[str], tmp_path: Path) -> None:
    result = run_cli(*verb, env=cli_env_for(tmp_path))
    assert result.returncode == 2
    assert "no index at" in result.stderr
    assert not (tmp_path / "data").exists()


def _ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback(), reason="no IPv6 loopback on this host")
def test_send_to_a_bracketed_ipv6_address(start_node, tmp_path: Path) -> None:
    node = start_node(node={"host": "::1"})
    f.write(f.cxr(), tmp_path / "one")
    result = run_cli("send", str(tmp_path / "one"), "--to", f"[::1]:{node.dicom_port}", env=cli_env(node.settings))
    assert result.returncode == 0, result.stderr
    assert "sent 1, failed 0, skipped 0" in result.stdout
