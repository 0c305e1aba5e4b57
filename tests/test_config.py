"""Settings: the shipped defaults load, env overrides apply, bad keys are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import default_config_path, load_settings


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run([sys.executable, "-c", "from node.cli import main; main()", *args],
                          check=False, capture_output=True, text=True, env={**os.environ, **(env or {})}, timeout=60)


def test_shipped_defaults_load_with_rules_for_the_three_families() -> None:
    settings = load_settings()
    assert {r.pipeline for r in settings.routing.rules} == {"cxr-abnormality", "ct-hemorrhage", "mr-metastasis"}
    assert settings.node.allow_loopback and settings.node.allowed_peers == []


def test_environment_overrides_a_nested_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PACSNODE_NODE__PORT", "11999")
    assert load_settings().node.port == 11999


def test_a_misspelt_key_is_an_error_naming_it(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("node:\n  prot: 104\n")
    with pytest.raises(ValidationError, match="prot"):
        load_settings(bad)


def test_config_check_prints_effective_settings_with_secrets_masked() -> None:
    result = run_cli("config", "check", env={"PACSNODE_BROKER__URL": "redis://:hunter2@127.0.0.1:6379/0"})
    assert result.returncode == 0, result.stderr
    assert "hunter2" not in result.stdout and "**********" in result.stdout
    assert "ae_title: PACSNODE" in result.stdout


def test_config_check_names_the_bad_key_and_fails(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing:\n  rules:\n    - {name: x, pipeline: Bad Name, match: {attribute: Modality, equals: CT}}\n")
    result = run_cli("config", "check", "--config", str(bad))
    assert result.returncode == 2
    assert "routing.rules.0.pipeline" in result.stderr


def test_serve_never_imports_torch() -> None:
    code = ("import sys; import node.cli, node.commands, node.service, node.synth; "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'GPU stack imported'")
    result = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_default_config_file_is_shipped() -> None:
    assert default_config_path().is_file()
