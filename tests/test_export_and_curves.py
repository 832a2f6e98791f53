"""HFExport writes loadable Hugging Face checkpoints; LearningCurves plots the CSV logs."""

import pandas as pd
import pytest
import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import ModelCheckpoint
from pytorch_lightning.loggers import CSVLogger
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM

from etpo_lightning import ETPOModule
from etpo_lightning.callbacks import HFExport, LearningCurves, plot_metrics_csv
from helpers import random_transition_batch, tiny_llama


class _Batches(torch.utils.data.Dataset):
    def __init__(self, batch, n):
        self.batch, self.n = batch, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.batch


class _RecordPolicyAtBest(pl.Callback):
    """Independent record of the policy's logits whenever the monitored value improves."""

    def __init__(self, probe):
        self.probe, self.best, self.logits_at_best = probe, float("inf"), None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        value = float(trainer.callback_metrics["train/q_loss"])
        if value < self.best:
            self.best = value
            with torch.no_grad():
                self.logits_at_best = pl_module.policy(self.probe).logits.clone()


def test_hf_export_best_and_last_reload_with_from_pretrained(tmp_path):
    module = ETPOModule(policy=tiny_llama(64), beta=0.1, policy_lr=5e-3, critic_lr=5e-3)
    probe = torch.tensor([[1, 5, 9, 12, 30]])
    recorder = _RecordPolicyAtBest(probe)
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", monitor="train/q_loss", mode="min", every_n_train_steps=1, save_last=True)
    trainer = pl.Trainer(
        max_steps=6, accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False,
        callbacks=[recorder, ckpt, HFExport()],
    )
    trainer.fit(module, DataLoader(_Batches(random_transition_batch(64), 20), batch_size=None))
    last = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "hf-last")
    best = AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt" / "hf-best")
    with torch.no_grad():
        torch.testing.assert_close(last(probe).logits, module.policy(probe).logits)
        torch.testing.assert_close(best(probe).logits, recorder.logits_at_best)
        # The export is the policy, not the critic or the frozen reference.
        assert not torch.allclose(last(probe).logits, module.reference(probe).logits)


def test_learning_curves_png_from_csv_logs(tmp_path):
    module = ETPOModule(policy=tiny_llama(64), beta=0.1)
    curves = LearningCurves()
    trainer = pl.Trainer(
        max_steps=4, accelerator="cpu", logger=CSVLogger(tmp_path), log_every_n_steps=1,
        enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False, callbacks=[curves],
    )
    trainer.fit(module, DataLoader(_Batches(random_transition_batch(64), 10), batch_size=None))
    assert curves.path is not None and curves.path.name == "curves.png"
    header = curves.path.read_bytes()[:24]
    assert header[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = int.from_bytes(header[16:20], "big"), int.from_bytes(header[20:24], "big")
    assert width > 400 and height > 300  # two panels at least (q_loss, entropy): a real figure
    assert (curves.path.parent / "metrics.csv").exists()  # next to the CSV logs


def test_plot_metrics_csv_skips_missing_metrics(tmp_path):
    csv = tmp_path / "metrics.csv"
    pd.DataFrame({"step": [0, 1], "epoch": [0, 0], "unrelated": [1.0, 2.0]}).to_csv(csv, index=False)
    assert plot_metrics_csv(csv, tmp_path / "x.png") is None
    pd.DataFrame({"step": [0, 1, 2], "rollout/reward_mean": [0.1, float("nan"), 0.3]}).to_csv(csv, index=False)
    out = plot_metrics_csv(csv, tmp_path / "y.png")
    assert out is not None and out.stat().st_size > 1000


@pytest.mark.parametrize("bad", [0, -3])
def test_rollout_refresh_rejects_bad_interval(bad):
    from etpo_lightning.callbacks import RolloutRefresh

    with pytest.raises(ValueError, match="every_n_steps"):
        RolloutRefresh(every_n_steps=bad)


def test_kl_monitor_heldout_perplexity_matches_independent_nll(tmp_path):
    import json
    import math
    from types import SimpleNamespace

    from etpo_lightning.callbacks import KLMonitor
    from etpo_lightning.callbacks.kl_monitor import read_heldout
    from etpo_lightning.tiny_coder.tokenizer import train_tokenizer

    texts = ["def build_model(x_train, y_train):\n    return None\n", "import numpy as np\nx = np.zeros(3)\n"]
    path = tmp_path / "heldout.jsonl"
    # The two formats read_heldout accepts: {"text"} and the tiny coder's {"prompt", "body"}.
    path.write_text(json.dumps({"text": texts[0]}) + "\n" + json.dumps({"prompt": texts[1][:10], "body": texts[1][10:]}) + "\n")
    assert read_heldout(path) == texts
    tokenizer = train_tokenizer(texts * 5, vocab_size=280)
    model = tiny_llama(len(tokenizer), seed=4)
    monitor = KLMonitor(heldout_path=str(path))
    fake_module = SimpleNamespace(policy=model, device=torch.device("cpu"))
    got = monitor.heldout_perplexity(fake_module, tokenizer)
    nll, count = 0.0, 0
    with torch.no_grad():
        for text in texts:  # one at a time: no padding at all
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(ids).logits[0, :-1].float(), -1)
            nll -= logp.gather(-1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    # float32 accumulation and left padding move it by ~3e-4 relative; a shift or padding
    # error moves it by far more (checked just below).
    assert got == pytest.approx(math.exp(nll / count), rel=2e-3)
    with torch.no_grad():
        wrong_nll, wrong_count = 0.0, 0
        for text in texts:  # an off-by-one shift: predicting each token from itself
            ids = tokenizer(text, return_tensors="pt")["input_ids"]
            logp = torch.log_softmax(model(ids).logits[0].float(), -1)
            wrong_nll -= logp.gather(-1, ids[0, :, None]).sum().item()
            wrong_count += ids.shape[1]
    assert got != pytest.approx(math.exp(wrong_nll / wrong_count), rel=2e-3)
