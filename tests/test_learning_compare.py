"""The learning benchmark's tables and ablation overrides (bench/), checked on small made-up inputs."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))  # the benchmark scripts are not a package


@pytest.fixture(scope="module")
def learning_compare():
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


def _recorded_result(tmp_path: Path, base: dict, name: str = "old", **changes) -> Path:
    import json

    result = {"base_model_sha256": "abc", "samples": 8, "eval_seed": 7, "base": base,
              "summary": {"PPO": {"seeds": [0, 1], "hf-best": {"reward_mean": [0.25, 0.5], "gain": [0.5, 0.75]},
                                  "hf-last": {"reward_mean": [0.75, 1.0], "gain": [1.0, 1.25]}}},
              "curves": {"PPO": [{"env_steps": [8.0, 16.0], "reward": [-0.5, 0.25], "kl": [0.0, 0.125]}]}}
    result.update(changes)
    path = tmp_path / f"{name}.json"
    path.write_text(json.dumps(result))
    return path


def test_a_recorded_label_is_taken_only_from_a_reproduced_base_evaluation(tmp_path, learning_compare):
    import argparse

    base = {"reward_mean": -0.25, "success_rate": 0.390625, "errors": {"syntax": 3}}
    args = argparse.Namespace(samples=8, eval_seed=7, checkpoints=["hf-best", "hf-last"])
    entry, curves = learning_compare.recorded_entry("PPO", _recorded_result(tmp_path, base), base, "abc", args)
    assert entry["hf-last"]["gain"] == [1.0, 1.25]
    curve = learning_compare.curve_from_json(curves[0])
    assert curve.index.tolist() == [8.0, 16.0] and curve["rollout/reward_mean"].tolist() == [-0.5, 0.25]
    assert learning_compare.curve_to_json(curve) == curves[0]  # what a new result writes, it reads back

    # A few sklearn fits differ across CPUs: the same programs, a mean reward 7e-6 away, is today's,
    # and the recorded rewards' gains are taken against today's base.
    today = {**base, "reward_mean": -0.25 + 2 ** -17}
    recorded, _ = learning_compare.recorded_entry("PPO", _recorded_result(tmp_path, base, "e"), today, "abc", args)
    assert recorded["hf-best"]["gain"] == [0.5 - 2 ** -17, 0.75 - 2 ** -17]
    other_programs = {**base, "errors": {"syntax": 2, "exception": 1}}
    far = {**base, "reward_mean": -0.2498}
    for path, message in [(_recorded_result(tmp_path, other_programs, "a"), "base evaluation"),
                          (_recorded_result(tmp_path, far, "f"), "base evaluation"),
                          (_recorded_result(tmp_path, base, "b", eval_seed=8), "eval_seed 8 != 7"),
                          (_recorded_result(tmp_path, base, "c", base_model_sha256="abd"), "base_model_sha256"),
                          (_recorded_result(tmp_path, base, "d", summary={}), "no label 'PPO'")]:
        with pytest.raises(SystemExit, match=message):
            learning_compare.recorded_entry("PPO", path, base, "abc", args)


def test_recorded_labels_may_hold_equals_signs_and_be_renamed(learning_compare):
    parsed = learning_compare.parse_recorded(["PPO=bench/results/a.json",
                                              "ETPO(lambda=0.9), critic lr 1e-3=b/c.json#ETPO(lambda=0.9)"])
    assert parsed == {"PPO": (Path("bench/results/a.json"), "PPO"),
                      "ETPO(lambda=0.9), critic lr 1e-3": (Path("b/c.json"), "ETPO(lambda=0.9)")}
    with pytest.raises(SystemExit, match="expected LABEL=PATH.json"):
        learning_compare.parse_recorded(["PPO=runs/bench_learning/ppo"])


def _kl_monitor(cfg: dict) -> dict:
    (monitor,) = [c for c in cfg["trainer"]["callbacks"] if c["class_path"].endswith(".KLMonitor")]
    return monitor


def test_an_ablation_override_changes_one_callback_and_nothing_else(tmp_path):
    """``--set trainer.callbacks[KLMonitor].init_args.target_kl=0.15``: the target-KL ablation
    of docs/results.md changes that one callback's argument (found by class), nothing else."""
    from derive_config import derive_config, parse_sets

    shipped = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    sets = parse_sets(["trainer.callbacks[KLMonitor].init_args.target_kl=0.15", "data.replay_collections=16"])
    plain = yaml.safe_load(derive_config(ROOT / "configs" / "quickstart.yaml", tmp_path / "a").read_text())
    ablation = yaml.safe_load(derive_config(ROOT / "configs" / "quickstart.yaml", tmp_path / "a", overrides=sets).read_text())
    assert _kl_monitor(shipped)["init_args"]["target_kl"] == 0.1
    assert _kl_monitor(ablation)["init_args"] == {**_kl_monitor(shipped)["init_args"], "target_kl": 0.15}
    assert ablation["data"]["replay_collections"] == 16
    _kl_monitor(ablation)["init_args"]["target_kl"] = 0.1
    ablation["data"]["replay_collections"] = shipped["data"]["replay_collections"]
    assert ablation == plain


@pytest.mark.parametrize("key, message", [
    ("trainer.callbacks[EarlyStopping].init_args.patience", "0 elements of 'callbacks' have class 'EarlyStopping'"),
    ("trainer.callbacks[KLMonitor]", "name a field of the list element"),
])
def test_an_override_that_names_no_single_element_says_so(tmp_path, key, message):
    from derive_config import derive_config

    with pytest.raises(KeyError, match=message.replace("[", r"\[")):
        derive_config(ROOT / "configs" / "quickstart.yaml", tmp_path, overrides={key: 3})


def test_the_derived_ablation_reaches_the_trainer(tmp_path):
    """Through the ``etpo`` CLI: the trainer's KLMonitor gets the overridden target."""
    from derive_config import derive_config
    from etpo_lightning.callbacks import KLMonitor
    from etpo_lightning.cli.main import cli_main
    from etpo_lightning.envs.toy import DEFAULT_WORDS
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer
    from helpers import tiny_llama

    model_dir = tmp_path / "model"
    tok = train_tokenizer([f"Say the word '{w}'.\nAnswer: {w}" for w in DEFAULT_WORDS] * 5, vocab_size=300)
    tok.save_pretrained(model_dir)
    tiny_llama(len(tok)).save_pretrained(model_dir)
    config = derive_config(ROOT / "configs" / "quickstart.yaml", tmp_path / "run", model=str(model_dir),
                           overrides={"trainer.callbacks[KLMonitor].init_args.target_kl": 0.15})
    cli = cli_main(["--config", str(config), "--trainer.logger=false"], run=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, KLMonitor)]
    assert monitor.target_kl == 0.15


def test_reuse_refuses_a_run_trained_with_another_config(tmp_path):
    """``bench/learning.py --reuse`` must not pass off runs of an old config as the new one's."""
    import learning
    from derive_config import derive_config, derived

    config = ROOT / "configs" / "quickstart.yaml"
    root = tmp_path / "seed0"
    derive_config(config, root, seed=0, max_steps=300)
    run_info = {"train_seconds": 1.0, "extra": []}
    learning.check_reusable(root, derived(config, root, seed=0, max_steps=300), [], run_info)  # the same: reused
    with pytest.raises(SystemExit, match=r"another config \(data\.replay_collections\)"):
        learning.check_reusable(root, derived(config, root, seed=0, max_steps=300,
                                              overrides={"data.replay_collections": 16}), [], run_info)
    with pytest.raises(SystemExit, match=r"trainer\.callbacks\.1\.init_args\.target_kl"):
        learning.check_reusable(root, derived(config, root, seed=0, max_steps=300, overrides={
            "trainer.callbacks[KLMonitor].init_args.target_kl": 0.15}), [], run_info)
    with pytest.raises(SystemExit, match=r"another config \(model\.init_args\.lam\)"):
        learning.check_reusable(root, derived(config, root, seed=0, max_steps=300), ["--model.init_args.lam=0"], run_info)
    with pytest.raises(SystemExit, match=r"CLI arguments \[\] -> \['--print_config'\]"):
        learning.check_reusable(root, derived(config, root, seed=0, max_steps=300), ["--print_config"], run_info)
    # A value given on the command line then and in the config now is the same run.
    run_info["extra"] = ["--data.replay_collections=16"]
    learning.check_reusable(root, derived(config, root, seed=0, max_steps=300,
                                          overrides={"data.replay_collections": 16}), [], run_info)
    with pytest.raises(SystemExit, match=r"data\.replay_collections"):
        learning.check_reusable(root, derived(config, root, seed=0, max_steps=300), [], run_info)
    # A float written as the CLI takes it (3e-4, a string to YAML 1.1) is the config's 3.0e-4.
    run_info["extra"] = ["--model.init_args.critic_lr=3e-4"]
    learning.check_reusable(root, derived(config, root, seed=0, max_steps=300,
                                          overrides={"model.init_args.critic_lr": 3.0e-4}), [], run_info)
    with pytest.raises(SystemExit, match=r"model\.init_args\.critic_lr"):
        learning.check_reusable(root, derived(config, root, seed=0, max_steps=300,
                                              overrides={"model.init_args.critic_lr": 1.0e-4}), [], run_info)


def test_assignments_parse_values_as_the_cli_does():
    from derive_config import parse_assignment

    assert parse_assignment("model.init_args.critic_lr=3e-4") == ("model.init_args.critic_lr", 3e-4)
    assert parse_assignment("a=1.0e-3") == ("a", 1e-3)
    assert parse_assignment("a=16") == ("a", 16)
    assert parse_assignment("a=cosine") == ("a", "cosine")
    assert parse_assignment("a=3e-4x") == ("a", "3e-4x")


def test_a_trl_run_is_read_as_a_curve_of_its_groups(tmp_path, learning_compare):
    """bench/trl_learning.py's metrics.csv: each group's reward at its programs, with the KL of its last update."""
    from trl_learning import write_metrics

    root = tmp_path / "seed5"
    curve = [(8, -0.5), (16, 0.25), (24, 0.75)]
    kls = [(step, 0.01 * step) for step in range(1, 7)]  # num_iterations 2: 2 optimizer steps per group
    write_metrics(root / "logs" / "version_0" / "metrics.csv", curve, kls, num_iterations=2)
    read = learning_compare.seed_curve(root)
    assert list(read.index) == [8, 16, 24]
    assert list(read["rollout/reward_mean"]) == [-0.5, 0.25, 0.75]
    assert read["monitor/kl"].tolist() == pytest.approx([0.02, 0.04, 0.06])


def test_selection_ranks_runs_by_the_mean_of_their_last_collections(tmp_path, learning_compare):
    import json

    from selection import rank
    from trl_learning import write_metrics

    def run(name: str, seeds: dict[int, list[float]]) -> Path:
        for seed, rewards in seeds.items():
            root = tmp_path / name / f"seed{seed}"
            write_metrics(root / "logs" / "version_0" / "metrics.csv",
                          [(8 * (i + 1), r) for i, r in enumerate(rewards)], [], num_iterations=1)
            (root / "run_info.json").write_text(json.dumps({}))
        return tmp_path / name

    early = run("early", {0: [0.9, 0.9, -1.0, -1.0], 1: [0.9, -0.5, -0.5, -0.5]})
    late = run("late", {0: [-1.0, -1.0, 0.5, 0.3]})
    (tmp_path / "unfinished" / "seed0").mkdir(parents=True)
    rows = rank([early, late, tmp_path / "unfinished"], last=2)
    assert [r["run"] for r in rows] == ["late", "early"]
    assert rows[0]["mean"] == pytest.approx(0.4)
    assert rows[1]["seeds"] == {0: pytest.approx(-1.0), 1: pytest.approx(-0.5)}
    assert rows[1]["mean"] == pytest.approx(-0.75)
