"""Why pretraining did or did not help: a linear probe on frozen encoder features.

Finetuning mixes two questions: did SwAV learn features that carry the finding at all, and does
the finetuning recipe make use of them? The probe answers the first alone. For each task it
freezes an encoder, pools its features over every training sample, fits an L2-regularised
logistic regression (scikit-learn's, on standardised features) on the training split and reports the test AUC at sample level (the image
for radiographs, the slice for CT and MR: "any hemorrhage", "slice holds a metastasis"). It does
this for the pretrained encoder and for the same architecture at its random initialisation (seed
0), which is where every scratch arm starts. Pretrained well above random: the archive taught
something about lesions. About equal: SwAV learned little the finding needs (archive, recipe or
augmentations), and no finetuning recipe can make pretraining help.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import Pipeline, make_pipeline
from sklearn.preprocessing import StandardScaler

from models.finetune import TaskData, batch_inputs
from models.metrics import roc_auc
from models.preprocess import InputSpec
from pretrain.backbones import Encoder

BATCH = 64
L2 = 1e-2  # on standardised features, per sample; the probe must not overfit a few hundred samples


@torch.no_grad()
def features(encoder: Encoder, data: TaskData, spec: InputSpec, device: torch.device) -> torch.Tensor:
    """Pooled features of every sample, (N, feature_dim), float32 on the CPU."""
    encoder.eval().to(device)
    out = [encoder(batch_inputs(data, range(start, min(start + BATCH, len(data))), spec).to(device)).float().cpu()
           for start in range(0, len(data), BATCH)]
    return torch.cat(out)


def sample_labels(data: TaskData, kind: str) -> torch.Tensor:
    """The probe's target per sample: the first output ("any") or, for masks, "holds a lesion"."""
    if kind == "segmentation":
        return data.targets.flatten(1).any(dim=1).float()
    return data.targets[:, 0].float()


def fit_probe(x: np.ndarray, y: np.ndarray) -> Pipeline:
    """Standardise ``x``, then a logistic regression minimising the mean log-loss + ``L2 * |w|^2``.

    scikit-learn's objective is ``C * summed log-loss + |w|^2 / 2``, the same minimum at
    ``C = 1 / (2 * L2 * n)``: the penalty per sample stays fixed however many samples there are.
    """
    return make_pipeline(StandardScaler(), LogisticRegression(C=1 / (2 * L2 * len(y)), max_iter=1000)).fit(x, y)


def probe_scores(encoder: Encoder, train: TaskData, test: TaskData, spec: InputSpec, kind: str,
                 device: torch.device) -> tuple[np.ndarray, np.ndarray] | None:
    """(test labels, probe scores) of a linear probe on ``encoder``'s frozen features; ``None``
    without both classes in each split."""
    y_train, y_test = sample_labels(train, kind), sample_labels(test, kind)
    if not (0 < y_train.sum() < len(y_train)) or not (0 < y_test.sum() < len(y_test)):
        return None
    probe = fit_probe(features(encoder, train, spec, device).numpy(), y_train.numpy())
    return y_test.numpy(), probe.decision_function(features(encoder, test, spec, device).numpy())


def probe_auc(encoder: Encoder, train: TaskData, test: TaskData, spec: InputSpec, kind: str,
              device: torch.device) -> dict[str, Any]:
    """Test AUC of a linear probe on ``encoder``'s frozen features (NaN without both classes)."""
    scored = probe_scores(encoder, train, test, spec, kind, device)
    if scored is None:
        return {"auc": float("nan"), "train": len(train), "test": len(test), "note": "one class only"}
    y_test, scores = scored
    return {"auc": roc_auc(y_test, scores), "train": len(train), "test": len(test),
            "positives_test": int(y_test.sum())}


def paired_difference(y: np.ndarray, first: np.ndarray, second: np.ndarray, groups: list[int],
                      resamples: int = 1000, seed: int = 0) -> tuple[float, float, float]:
    """AUC(second) - AUC(first) on the same samples, with a 95% interval from a cluster bootstrap.

    Samples of one study (the slices of a CT or MR) are not independent, so whole studies are
    drawn with replacement; a resample without both classes is drawn again.
    """
    by_group: dict[int, list[int]] = {}
    for sample, group in enumerate(groups):
        by_group.setdefault(group, []).append(sample)
    members = [np.asarray(v) for v in by_group.values()]
    rng = np.random.default_rng(seed)
    diffs: list[float] = []
    while len(diffs) < resamples:
        picks = np.concatenate([members[i] for i in rng.integers(0, len(members), len(members))])
        if 0 < y[picks].sum() < len(picks):
            diffs.append(roc_auc(y[picks], second[picks]) - roc_auc(y[picks], first[picks]))
    low, high = np.percentile(diffs, [2.5, 97.5])
    return roc_auc(y, second) - roc_auc(y, first), float(low), float(high)
