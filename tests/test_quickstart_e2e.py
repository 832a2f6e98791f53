"""The README's main job, end to end, from a clean cache: the shipped tiny coder, no build (slow)."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))


@pytest.mark.slow
def test_quickstart_from_a_clean_cache(tmp_path):
    from derive_config import derive_config

    out = tmp_path / "run"
    config = derive_config(ROOT / "configs" / "quickstart.yaml", out, max_steps=3,
                           overrides={"data.num_envs": 4, "data.batch_size": 4, "data.max_new_tokens": 64})
    env = dict(os.environ, ETPO_CACHE_DIR=str(tmp_path / "cache"))
    proc = subprocess.run(["etpo", "fit", "--config", str(config), "--trainer.enable_progress_bar=false"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # Nothing was built: the shipped tiny coder is the base, so the frozen reference holds its weights.
    assert not any((tmp_path / "cache").rglob("model.safetensors"))
    # Checkpoints, logs, curves and the Hugging Face export.
    assert (out / "checkpoints" / "last.ckpt").exists()
    metrics = pd.read_csv(next(out.rglob("metrics.csv")))
    assert metrics["train/q_loss"].notna().sum() == 3
    assert metrics["rollout/reward_mean"].dropna().between(-1.0, 1.0).all()
    assert next(out.rglob("curves.png")).stat().st_size > 1000
    export = out / "checkpoints" / "hf-last"
    model = AutoModelForCausalLM.from_pretrained(export)
    tokenizer = AutoTokenizer.from_pretrained(export)
    prompt = "def build_model(x_train, y_train):\n"
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"]
    torch.manual_seed(0)
    out_ids = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=True,
                             pad_token_id=tokenizer.pad_token_id)
    assert out_ids.shape[1] > ids.shape[1]
    assert tokenizer.decode(out_ids[0]).startswith(prompt)
    # The checkpoint resumes: it holds both optimizers and the datamodule's replay.
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=False)
    assert len(ckpt["optimizer_states"]) == 2
    assert ckpt["RolloutDataModule"]["collections"] >= 1
    from safetensors.torch import load_file

    from etpo_lightning.tiny_coder import SHIPPED_DIR

    shipped = load_file(SHIPPED_DIR / "model.safetensors")
    reference = {k.removeprefix("reference."): v for k, v in ckpt["state_dict"].items() if k.startswith("reference.")}
    assert set(shipped) <= set(reference)
    assert all(torch.equal(reference[k], v) for k, v in shipped.items())
