"""Build the tiny sklearn coder and measure it.

Prints and writes to ``bench/results/tiny_coder.json``: build time, held-out body perplexity,
and for ``--samples`` bodies sampled on a breast_cancer prompt (temperature 1.0, 160 new
tokens): the share that ends with EOS, parses, runs and returns a model with
``predict_proba``, the errors, the estimator choices and the 3-fold ROC AUC of those that run.

The bodies are executed in a separate Python process (one alarm-guarded run each), never in
this one. By default the build goes to a fresh temporary cache so the time is a real build;
``--cache-dir`` reuses (or fills) a cache instead.

    python bench/build_tiny_coder.py [--samples 30] [--seed 0] [--threads N] [--cache-dir DIR]
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from transformers import AutoModelForCausalLM, AutoTokenizer

from etpo_lightning.envs.prompts import render_task_prompt
from etpo_lightning.tiny_coder import ensure_tiny_coder, estimator_name, parses, sample_bodies

RESULTS = Path(__file__).parent / "results" / "tiny_coder.json"

# Runs each body on breast_cancer: build_model on 2/3, ROC AUC of predict_proba on 1/3, x3.
_RUNNER = r"""
import json, signal, sys, warnings
import numpy as np
from sklearn.datasets import load_breast_cancer
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import StratifiedKFold
warnings.filterwarnings("ignore")
x, y = load_breast_cancer(return_X_y=True)
def alarm(*_):
    raise TimeoutError("took longer than 60 s")
signal.signal(signal.SIGALRM, alarm)
out = []
for body in json.load(sys.stdin):
    signal.alarm(60)
    try:
        ns = {}
        exec(compile("def build_model(x_train, y_train):\n" + body, "<string>", "exec"), ns)
        aucs = []
        for tr, te in StratifiedKFold(3, shuffle=True, random_state=0).split(x, y):
            model = ns["build_model"](x[tr], y[tr])
            aucs.append(roc_auc_score(y[te], model.predict_proba(x[te])[:, 1]))
        out.append({"ok": True, "auc": float(np.mean(aucs))})
    except BaseException as err:
        out.append({"ok": False, "error": f"{type(err).__name__}: {str(err)[:160]}"})
    finally:
        signal.alarm(0)
print(json.dumps(out))
"""


def run_bodies(bodies: list[str]) -> list[dict]:
    proc = subprocess.run([sys.executable, "-c", _RUNNER], input=json.dumps(bodies), capture_output=True, text=True, timeout=3600)
    if proc.returncode != 0:
        raise RuntimeError(proc.stderr[-2000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--cache-dir", default=None, help="reuse this cache instead of a fresh temporary one")
    parser.add_argument("--out", default=str(RESULTS))
    args = parser.parse_args()

    tmp = None if args.cache_dir else tempfile.TemporaryDirectory(prefix="tiny-coder-bench-")
    t0 = time.perf_counter()
    path = ensure_tiny_coder(args.cache_dir or tmp.name, seed=args.seed, num_threads=args.threads)
    wall = time.perf_counter() - t0
    info = json.loads((path / "build_info.json").read_text())

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = render_task_prompt("breast_cancer - diagnose malignant vs benign tumours from cell nucleus measurements", (455, 30), 2)
    sampled = sample_bodies(model, tok, prompt, n=args.samples, seed=args.seed)
    bodies = [b for b, _ in sampled]
    runs = run_bodies(bodies)
    aucs = [r["auc"] for r in runs if r["ok"]]
    report = {
        "torch_threads": args.threads or "default",
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15_min": [round(x, 2) for x in os.getloadavg()],
        "build_wall_seconds": round(wall, 1),
        "build_seconds": info["build_seconds"],
        "build_seconds_parts": info["seconds"],
        "n_params": info["n_params"],
        "steps": info["steps"],
        "final_loss": round(info["final_loss"], 4),
        # Compare this before comparing numbers from two builds (docs/tiny_coder.md).
        "weights_sha256": info.get("weights_sha256"),
        "reproducible_with": info.get("reproducible_with"),
        "heldout_body_perplexity": round(info["heldout_body_perplexity"], 4),
        "heldout_body_perplexity_unbaked": round(info["heldout_body_perplexity_unbaked"], 4),
        "samples": len(bodies),
        "share_ended_with_eos": sum(e for _, e in sampled) / len(sampled),
        "share_parse": sum(parses(b) for b in bodies) / len(bodies),
        "share_run_with_predict_proba": len(aucs) / len(bodies),
        "auc_of_running": {"min": min(aucs, default=None), "mean": sum(aucs) / len(aucs) if aucs else None, "max": max(aucs, default=None)},
        "estimators": dict(collections.Counter(str(estimator_name(b)) for b in bodies).most_common()),
        "errors": dict(collections.Counter(r["error"].split(":")[0] for r in runs if not r["ok"]).most_common()),
        "examples": [{"body": b, **r} for b, r in list(zip(bodies, runs))[:6]],
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(json.dumps({k: v for k, v in report.items() if k != "examples"}, indent=1))
    print(f"wrote {args.out}")
    if tmp is not None:
        tmp.cleanup()


if __name__ == "__main__":
    main()
