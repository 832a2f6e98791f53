"""The learning benchmark's tables and ablation configs (bench/), checked on small made-up inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def learning_compare():
    sys.path.insert(0, str(ROOT / "bench"))
    import learning_compare

    return learning_compare


def test_failure_table_averages_each_kind_over_seeds(learning_compare):
    base = {"success_rate": 0.5, "auc_mean": 0.7, "errors": {"exception": 6, "syntax": 2}}
    summary = {"ETPO": {"hf-last": {"success_rate": [0.75, 0.25], "auc_mean": [0.8, 0.9],
                                    "errors": [{"syntax": 1}, {"syntax": 4, "timeout": 2, "exception": 3}]}}}
    table = learning_compare.failure_table(summary, base, ["hf-last"], samples=8)
    lines = table.splitlines()
    # Kinds ordered by their total count over all rows: exception 9, syntax 7, timeout 2.
    assert lines[2] == "| agent | checkpoint | success rate | mean AUC of programs that ran | exception | syntax | timeout |"
    assert lines[4] == "| base |  | 0.500 | 0.700 | 6.0 | 2.0 | 0.0 |"
    assert lines[5] == "| ETPO | hf-last | 0.500 | 0.850 | 1.5 | 2.5 | 1.0 |"
    assert len(lines) == 6


def test_target_kl_ablation_differs_from_the_quickstart_only_in_the_target():
    shipped = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    ablation = yaml.safe_load((ROOT / "bench" / "configs" / "quickstart_target_kl0.15.yaml").read_text())
    monitors = [c for c in ablation["trainer"]["callbacks"] if c["class_path"].endswith("KLMonitor")]
    assert monitors[0]["init_args"]["target_kl"] == 0.15
    monitors[0]["init_args"]["target_kl"] = 0.1
    ablation["trainer"]["default_root_dir"] = "runs/quickstart"
    assert ablation == shipped
