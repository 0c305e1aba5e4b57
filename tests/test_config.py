"""Settings: the shipped defaults load, env overrides apply, bad keys are named."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from config.settings import DicomWebDestination, default_config_path, load_settings
from node.child_process import pacsnode_command


def run_cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    import os

    return subprocess.run(pacsnode_command(*args),
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


def test_a_site_file_merges_into_the_shipped_defaults_section_by_section(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("destinations:\n  - {name: pacs, host: 10.1.2.3, port: 104, ae_title: MAIN_PACS}\n"
                    "node:\n  port: 104\n")
    settings = load_settings(site)
    shipped = load_settings()
    assert [r.name for r in settings.routing.rules] == [r.name for r in shipped.routing.rules] != []
    assert settings.node.port == 104 and settings.node.ae_title == shipped.node.ae_title  # merged key by key
    assert [d.name for d in settings.destinations] == ["pacs"]


def test_a_list_in_a_site_file_replaces_the_shipped_list(tmp_path: Path) -> None:
    site = tmp_path / "site.yaml"
    site.write_text("routing:\n  rules:\n    - {name: only-ct, pipeline: ct-hemorrhage, match: "
                    "{attribute: Modality, equals: CT}}\n")
    assert [r.name for r in load_settings(site).routing.rules] == ["only-ct"]
    site.write_text("routing:\n  rules: []\n")
    assert load_settings(site).routing.rules == []


def _install_model(models_dir: Path, name: str) -> None:
    version = models_dir / name / "1"
    version.mkdir(parents=True)
    (version / "card.yaml").write_text("name: stand-in\n")  # the layout is what the node checks


def test_config_check_warns_about_what_the_configuration_will_not_do(tmp_path: Path) -> None:
    models = tmp_path / "models"
    _install_model(models, "cxr-abnormality")
    env = {"PACSNODE_WORKERS__MODELS_DIR": str(models)}
    shipped = run_cli("config", "check", env=env)
    assert shipped.returncode == 0, shipped.stderr
    warnings = [line for line in shipped.stderr.splitlines() if line.startswith("warning: ")]
    assert any("'ct-hemorrhage' (routing rule head-ct) has no installed model" in w for w in warnings)
    assert any("'mr-metastasis'" in w for w in warnings)
    assert not any("'cxr-abnormality'" in w for w in warnings), "an installed model was reported missing"
    assert any("no destinations" in w for w in warnings)
    assert not any("no routing rules" in w for w in warnings)

    site = tmp_path / "site.yaml"
    site.write_text("routing:\n  rules: []\ndestinations:\n  - {name: pacs, host: 10.1.2.3, port: 104, "
                    "ae_title: MAIN_PACS}\n")
    bare = run_cli("config", "check", "--config", str(site), env=env)
    assert bare.returncode == 0, bare.stderr
    assert "warning: no routing rules" in bare.stderr
    assert "no destinations" not in bare.stderr and "no installed model" not in bare.stderr


def test_models_are_not_checked_where_the_node_cannot_see_them(tmp_path: Path) -> None:
    """Remote workers (no embedded worker) with a registry the node does not mount: nothing to say."""
    env = {"PACSNODE_WORKERS__MODELS_DIR": str(tmp_path / "elsewhere"), "PACSNODE_WORKERS__EMBEDDED": "false"}
    result = run_cli("config", "check", env=env)
    assert result.returncode == 0, result.stderr
    assert "no installed model" not in result.stderr


def test_destinations_are_dimse_peers_or_dicomweb_servers() -> None:
    settings = load_settings(None, destinations=[
        {"name": "pacs", "host": "10.0.0.5", "port": 104, "ae_title": "PACS"},
        {"name": "vna", "kind": "dicomweb", "url": "https://vna.example/dicom-web", "token": "t" * 20}])
    pacs, vna = settings.destinations
    assert pacs.kind == "dimse" and vna.kind == "dicomweb" and isinstance(vna, DicomWebDestination)
    with pytest.raises(ValidationError, match="url"):
        load_settings(None, destinations=[{"name": "vna", "kind": "dicomweb", "url": "ftp://x"}])
    with pytest.raises(ValidationError, match="username and password together"):
        load_settings(None, destinations=[{"name": "vna", "kind": "dicomweb", "url": "http://x", "username": "u"}])
    with pytest.raises(ValidationError, match="ae_title"):
        load_settings(None, destinations=[{"name": "pacs", "host": "h", "port": 104}])
