"""The vLLM engine's settings, without vLLM: options checked, one-line error when it is
missing, and configs/quickstart_vllm.yaml kept equal to the quickstart but for the engine."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from etpo_lightning.datamodules.rollout import RolloutDataModule
from etpo_lightning.envs import KeywordEnv
from etpo_lightning.generation.vllm_options import VLLMNotInstalledError, VLLMOptions, vllm_installed
from helpers import word_tokenizer

ROOT = Path(__file__).resolve().parents[1]


def test_quickstart_vllm_is_the_quickstart_with_the_vllm_engine():
    sys.path.insert(0, str(ROOT / "bench"))
    from derive_config import differences

    quickstart = yaml.safe_load((ROOT / "configs" / "quickstart.yaml").read_text())
    with_vllm = yaml.safe_load((ROOT / "configs" / "quickstart_vllm.yaml").read_text())
    assert sorted(differences(quickstart, with_vllm)) == ["data.generation", "data.vllm", "trainer.default_root_dir"]
    assert with_vllm["data"]["generation"] == "vllm"
    VLLMOptions(**with_vllm["data"]["vllm"])


@pytest.mark.parametrize("kwargs,match", [
    (dict(kv_cache_gib=0), "kv_cache_gib"), (dict(gpu_memory_utilization=1.5), "gpu_memory_utilization"),
    (dict(max_model_len=1), "max_model_len"), (dict(dtype="float64"), "dtype"),
])
def test_bad_vllm_options_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        VLLMOptions(**kwargs)


def test_the_datamodule_checks_its_vllm_settings():
    tokenizer = word_tokenizer(["apple", "river"])
    with pytest.raises(ValueError, match="generation='hf'"):
        RolloutDataModule(env=KeywordEnv(), tokenizer=tokenizer, vllm=VLLMOptions())
    if vllm_installed():
        with pytest.raises(ValueError, match="max_model_len=64 is shorter than"):
            RolloutDataModule(env=KeywordEnv(), tokenizer=tokenizer, generation="vllm", max_prompt_tokens=60,
                              max_new_tokens=8, vllm=VLLMOptions(max_model_len=64))


@pytest.mark.skipif(vllm_installed(), reason="checks the error shown where vLLM is not installed")
def test_generation_vllm_without_vllm_is_one_line_and_exit_2():
    with pytest.raises(VLLMNotInstalledError, match=r"pip install .*\[vllm\]"):
        RolloutDataModule(env=KeywordEnv(), tokenizer=word_tokenizer(["apple"]), generation="vllm")
    proc = subprocess.run([str(Path(sys.executable).with_name("etpo")), "fit", "--config",
                           str(ROOT / "configs" / "quickstart_vllm.yaml"), "--trainer.max_steps=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    lines = [line for line in proc.stderr.splitlines() if line.startswith("etpo fit: error:")]
    assert len(lines) == 1 and "data.generation: generation='vllm' needs vLLM" in lines[0], proc.stderr[-2000:]
