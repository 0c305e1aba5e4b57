"""``pretrain prepare --part K/N`` run as two processes at once, ``pretrain merge``, and training on
the merged folder: the same images as one unpartitioned run, no study split across parts."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from node.synth import generate
from pretrain.command import app
from pretrain.partition import Part, merge_parts
from pretrain.shards import ShardSet
from tests.pretrain_support import write_recipe


def _invoke(*args: str) -> str:
    result = CliRunner().invoke(app, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def _images(shards: ShardSet) -> dict[tuple[str, int], bytes]:
    return {(record.sop_uid, record.frame): pixels.tobytes() for pixels, record in shards.iter_images()}


def test_parts_prepared_side_by_side_merge_into_what_one_run_writes(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    generate(archive, studies=5, kinds="cxr,ct-head", seed=5, ct_slices=4, ct_size=64, cxr_size=64)
    index = tmp_path / "index.sqlite"
    _invoke("index", "--archive", str(archive / "dicom"), "--out", str(index), "--workers", "1")
    common = ["--index", str(index), "--size", "32", "--slice-stride", "1", "--shard-size", "4", "--workers", "1"]
    _invoke("prepare", *common, "--out", str(tmp_path / "whole"))
    # Two hosts' worth: two processes, started together, each its own part and folder.
    processes = [subprocess.Popen([sys.executable, "-P", "-m", "node.cli", "pretrain", "prepare", *common,
                                   "--part", f"{k}/2", "--out", str(tmp_path / f"part-{k}")],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for k in (1, 2)]
    for process in processes:
        output, _ = process.communicate(timeout=240)
        assert process.returncode == 0, output
    parts = [ShardSet(tmp_path / f"part-{k}") for k in (1, 2)]
    studies = [{record.study_uid for _, record in part.iter_images()} for part in parts]
    assert studies[0] and studies[1] and not studies[0] & studies[1]  # whole studies, each in one part

    _invoke("merge", str(tmp_path / "part-1"), str(tmp_path / "part-2"), "--out", str(tmp_path / "merged"))
    merged, whole = ShardSet(tmp_path / "merged"), ShardSet(tmp_path / "whole")
    assert _images(merged) == _images(whole)
    assert merged.manifest.studies == whole.manifest.studies == 10
    assert merged.manifest.modalities == whole.manifest.modalities

    trained = _invoke("train", "--shards", str(tmp_path / "merged"), "--config",
                      str(write_recipe(tmp_path / "recipe.yaml")), "--out", str(tmp_path / "run"), "--max-steps", "2")
    assert "trained 2 step(s)" in trained


def test_merge_refuses_parts_that_do_not_belong_together(tmp_path: Path) -> None:
    archive = tmp_path / "archive"
    generate(archive, studies=2, kinds="cxr", seed=6, cxr_size=64)
    index = tmp_path / "index.sqlite"
    _invoke("index", "--archive", str(archive / "dicom"), "--out", str(index), "--workers", "1")
    for name, extra in (("a", ["--part", "1/2"]), ("b", ["--part", "2/2", "--size", "48"]), ("c", ["--part", "1/2"]),
                        ("plain", [])):
        _invoke("prepare", "--index", str(index), "--size", "32", "--workers", "1", *extra, "--out",
                str(tmp_path / name))
    with pytest.raises(ValueError, match="other settings"):
        merge_parts([tmp_path / "a", tmp_path / "b"], tmp_path / "m")
    with pytest.raises(ValueError, match="both part 1/2"):
        merge_parts([tmp_path / "a", tmp_path / "c"], tmp_path / "m")
    with pytest.raises(ValueError, match="not prepared with --part"):
        merge_parts([tmp_path / "plain"], tmp_path / "m")
    result = CliRunner().invoke(app, ["prepare", "--index", str(index), "--out", str(tmp_path / "x"), "--part", "3/2"])
    assert result.exit_code == 2 and "--part" in result.output


def test_parts_cover_every_study_once() -> None:
    uids = [f"2.25.{n}" for n in range(2000)]
    owners = [[Part(k, 3).owns(uid) for k in (1, 2, 3)] for uid in uids]
    assert all(sum(row) == 1 for row in owners)
    shares = np.mean(owners, axis=0)
    assert np.all(np.abs(shares - 1 / 3) < 0.05), shares
