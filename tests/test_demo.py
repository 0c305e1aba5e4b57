"""``pacsnode demo --quick``: the whole product end to end, as a user runs it (a real subprocess)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pydicom
from pydicom.uid import Comprehensive3DSRStorage

from node.index import StudyIndex
from node.worklist import StudyQuery, Worklist

SEG_STORAGE = "1.2.840.10008.5.1.4.1.1.66.4"


def test_quick_demo_delivers_every_study_and_reuses_its_models(tmp_path: Path) -> None:
    """Run as a user would: ``cd X && pacsnode demo --quick --out X``, twice. X holds folders named
    like our packages and modules (the second run also finds the demo's own ``node/broker/``), which
    must not shadow ours in any process the demo starts."""
    for shadow in ("node/broker", "workers/app", "models/registry", "config/settings"):
        (tmp_path / shadow).mkdir(parents=True, exist_ok=True)
    script = Path(sys.executable).with_name("pacsnode")  # the console script, as the README runs it
    command = [str(script), "demo", "--quick", "--out", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "demo complete" in first.stdout
    for task in ("cxr-abnormality", "ct-hemorrhage", "mr-metastasis"):
        assert f"{task}@1:" in first.stdout
        assert (tmp_path / "models" / task / "1" / "card.yaml").is_file()
    delivered = [pydicom.dcmread(p, stop_before_pixels=True) for p in (tmp_path / "destination").rglob("*.dcm")]
    studies = {str(ds.StudyInstanceUID) for ds in delivered}
    srs = [ds for ds in delivered if ds.SOPClassUID == Comprehensive3DSRStorage]
    assert len(studies) == 3 and len(srs) == 3
    assert all(ds.SOPClassUID in (Comprehensive3DSRStorage, SEG_STORAGE) for ds in delivered)

    _no_call_contradicts_its_probability(tmp_path / "node" / "index.sqlite3")
    assert (tmp_path / "node" / "broker").is_dir()
    again = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False, cwd=tmp_path)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "models: reusing cxr-abnormality@1, ct-hemorrhage@1, mr-metastasis@1" in again.stdout
    assert not (tmp_path / "models" / "cxr-abnormality" / "2").exists()


def _no_call_contradicts_its_probability(index_path: Path) -> None:
    """What the demo's table prints, read from the node's index: every call is at its threshold
    (present exactly when the calibrated probability reaches it), and a finding without a
    threshold has no call."""
    worklist = Worklist(StudyIndex(index_path))
    findings = [f for study in worklist.studies(StudyQuery()) for p in study.pipelines for f in p.findings]
    assert findings, "the demo reported no findings"
    for finding in findings:
        if finding.not_assessed is not None or finding.present is None:
            continue
        assert finding.threshold is not None and finding.probability is not None, finding
        assert finding.present == (finding.probability >= finding.threshold), finding.text()
