"""The tiny sklearn coder: corpus, errors of the broken programs, build, cache and reload."""

from __future__ import annotations

import ast
import collections
import json
import os
import re
import subprocess
import sys
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from etpo_lightning.core import model_aliases, models
from etpo_lightning.core.models import load_causal_lm, load_tokenizer, resolve_model_path
from etpo_lightning.envs.prompts import render_task_prompt
from etpo_lightning.tiny_coder import (
    FAILURE_KINDS,
    SHIPPED_DIR,
    TinyCoderConfig,
    build_tiny_coder,
    checkpoint_dir,
    ensure_tiny_coder,
    estimator_name,
    generate_samples,
    heldout_samples,
    load_samples,
    parses,
    sample_bodies,
    shipped_build_info,
    train_tokenizer,
)
from etpo_lightning.tiny_coder import build as build_module
from etpo_lightning.tiny_coder import weights_checksum
from etpo_lightning.tiny_coder.__main__ import REPRODUCIBILITY_KEYS
from etpo_lightning.tiny_coder.__main__ import main as cli_main
from etpo_lightning.tiny_coder.pretrain import body_perplexity, pretrain, short_prompt

DEF = "def build_model(x_train, y_train):\n"
TINY = dict(
    n_samples=160, vocab_size=320, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64,
    max_length=256, steps=30, batch_size=4, lr=1e-2, warmup_steps=2, eval_batch_size=8,
)


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """Builds here are tiny: one thread is as fast, and far faster when the two cores are busy."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="module")
def corpus():
    return generate_samples(500, seed=3)


# --------------------------------------------------------------------------- corpus

def test_corpus_is_deterministic_for_a_seed(corpus):
    assert generate_samples(500, seed=3) == corpus
    other = generate_samples(500, seed=4)
    assert sum(a.body == b.body for a, b in zip(corpus, other)) < 25


def test_corpus_is_varied(corpus):
    families = collections.Counter(s.estimator for s in corpus)
    assert len(families) >= 16
    # No family dominates: choices are about uniform, not biased to the best programs.
    assert max(families.values()) / len(corpus) < 0.12
    kinds = collections.Counter(s.kind for s in corpus)
    assert set(kinds) == {"ok", *FAILURE_KINDS}
    assert 0.18 <= 1 - kinds["ok"] / len(corpus) <= 0.32
    assert 0.12 <= sum(s.reflection for s in corpus) / len(corpus) <= 0.28
    assert len({s.body for s in corpus}) > 0.85 * len(corpus)
    assert len({s.prompt.split("# Dataset: ")[1].split("\n")[0] for s in corpus}) > 100
    # Mediocre and good choices both occur: KNN with and without a scaler.
    knn = [s.body for s in corpus if s.kind == "ok" and s.estimator == "KNeighborsClassifier"]
    assert any("Scaler" in b for b in knn) and any("Scaler" not in b for b in knn)


def test_prompts_and_bodies_have_the_environment_format(corpus):
    for s in corpus:
        assert s.prompt.startswith(render_task_prompt("x", (1, 1), 2).split("# Dataset:")[0])
        assert s.prompt.endswith(DEF)
        assert ("# Your previous build_model failed:" in s.prompt) == s.reflection
        assert "GridSearchCV(" not in s.text
        assert all(line.startswith("    ") for line in s.body.splitlines() if line.strip() and s.kind != "syntax")
        assert s.body.endswith("\n")
        assert (s.error == "") == (s.kind == "ok")


def test_bodies_parse_except_the_syntax_slips(corpus):
    for s in corpus:
        assert parses(s.body) == (s.kind != "syntax"), (s.kind, s.body)
    assert all(s.error.startswith(("SyntaxError", "IndentationError")) for s in corpus if s.kind == "syntax")


def test_bodies_are_short(corpus):
    tok = train_tokenizer((t for s in corpus for t in (s.prompt, s.body)), 1024)
    lengths = np.array([len(tok(s.body).input_ids) for s in corpus])
    assert np.percentile(lengths, 95) < 130 and lengths.max() < 200


def _normalise(message: str) -> str:
    """Drop file paths and locations, and sort sets sklearn prints in hash order."""
    message = re.sub(r" \((/|<string>)[^)]*\)$", "", message)
    return re.sub(r"\{([^}]*)\}", lambda m: "{" + ", ".join(sorted(m.group(1).split(", "))) + "}", message)


def _run(body: str, n_classes: int, n_features: int) -> str:
    """The error (``Type: message``) of building, fitting and predict_proba, or ''."""
    rng = np.random.default_rng(0)
    y = np.arange(150) % n_classes
    x = rng.normal(size=(150, n_features)) + 0.7 * y[:, None]
    ns: dict = {}
    try:
        exec(compile(DEF + body, "<string>", "exec"), ns)
        proba = ns["build_model"](x, y).predict_proba(x)
        assert proba.shape == (150, n_classes)
        return ""
    except Exception as err:  # noqa: BLE001 - any error is the observation
        return f"{type(err).__name__}: {err}"


def test_failing_bodies_raise_the_error_their_sample_states_and_good_ones_run():
    from threadpoolctl import threadpool_limits

    samples = generate_samples(1200, seed=11)
    slow = {"StackingClassifier", "GradientBoostingClassifier", "VotingClassifier", "BaggingClassifier", "MLPClassifier"}
    picked: dict[str, list] = collections.defaultdict(list)
    for s in samples:
        quota = 14 if s.kind == "ok" else 3
        if s.estimator not in slow and len(picked[s.kind]) < quota:
            picked[s.kind].append(s)
    assert set(picked) == {"ok", *FAILURE_KINDS}
    with threadpool_limits(1), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for kind, group in picked.items():
            for s in group:
                shape = re.search(r"shape \((\d+), (\d+)\); y_train: integer labels, (\d+) classes", s.prompt)
                got = _run(s.body, min(int(shape[3]), 3), min(int(shape[2]), 8))
                assert _normalise(got) == _normalise(s.error), (kind, s.body, got)


def test_estimator_name():
    assert estimator_name("    from sklearn.svm import SVC, LinearSVC\n    m = LinearSVC()\n") == "LinearSVC"
    body = "    m = make_pipeline(StandardScaler(), VotingClassifier([('a', SVC(probability=True))]))\n"
    assert estimator_name(body) == "VotingClassifier"
    assert estimator_name("    return ensemble.RandomForestClassifier().fit(x_train, y_train)\n") == "RandomForestClassifier"
    assert estimator_name("    return None\n") is None


# --------------------------------------------------------------------------- build and cache

@pytest.fixture(scope="module")
def tiny_build(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "direct"
    result = build_tiny_coder(out, seed=0, config=TinyCoderConfig(**TINY), progress=False)
    return out, result


def test_build_writes_a_loadable_checkpoint(tiny_build):
    out, result = tiny_build
    for name in ("config.json", "model.safetensors", "generation_config.json", "tokenizer.json",
                 "tokenizer_config.json", "heldout.jsonl", "build_info.json", ".complete"):
        assert (out / name).is_file(), name
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = AutoTokenizer.from_pretrained(out)
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.padding_side) == (0, 1, 2, "left")
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample, gen.top_k, gen.top_p) == (2, 0, True, 0, 1.0)
    prompt = result.heldout[0].prompt
    assert tok(prompt).input_ids == result.tokenizer(prompt).input_ids
    ids = torch.tensor([tok(prompt).input_ids])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, result.model.eval()(ids).logits)


def test_build_info_and_heldout(tiny_build):
    out, result = tiny_build
    info = json.loads((out / "build_info.json").read_text())
    assert info["seed"] == 0 and info["steps"] == 30 and len(info["losses"]) == 30
    assert info["config"] == TinyCoderConfig(**TINY).to_dict()
    # Training works: the loss falls well below its start (ln 320 = 5.8 for uniform guesses).
    assert info["losses"][0] > 5.0 and info["final_loss"] < 0.75 * info["losses"][0]
    assert info["final_loss"] < info["initial_loss"]
    assert 1.0 < info["heldout_body_perplexity"] < 320 and info["heldout_body_perplexity"] == result.heldout_perplexity
    assert info["n_train_samples"] + info["n_heldout_samples"] == 160 and info["n_heldout_samples"] == 8
    # The weights' checksum and what the bits depend on (docs/tiny_coder.md).
    assert info["weights_sha256"] == weights_checksum(out) and len(info["weights_sha256"]) == 64
    env = info["reproducible_with"]
    assert env["torch_threads"] == 1 and env["torch_version"] == torch.__version__
    assert env["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    held = load_samples(out / "heldout.jsonl")
    assert held == result.heldout == heldout_samples(seed=0, n_samples=160, heldout_fraction=0.05)
    assert not {s.text for s in held} & {s.text for s in result.train}


def test_same_seed_gives_identical_weights_and_other_seed_does_not(tiny_build, tmp_path):
    out, result = tiny_build
    again = build_tiny_coder(tmp_path / "again", seed=0, config=TinyCoderConfig(**TINY), progress=False)
    a, b = result.model.state_dict(), again.model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "again" / "tokenizer.json").read_text() == (out / "tokenizer.json").read_text()
    other = build_tiny_coder(tmp_path / "other", seed=1, config=TinyCoderConfig(**TINY), progress=False)
    assert not torch.equal(a["model.embed_tokens.weight"][:300], other.model.state_dict()["model.embed_tokens.weight"][:300])
    # Same weights, same checksum (a rebuild elsewhere can be checked against build_info.json).
    checksum = json.loads((out / "build_info.json").read_text())["weights_sha256"]
    assert json.loads((tmp_path / "again" / "build_info.json").read_text())["weights_sha256"] == checksum
    assert json.loads((tmp_path / "other" / "build_info.json").read_text())["weights_sha256"] != checksum


def test_weights_checksum_sees_one_changed_weight(tiny_build, tmp_path):
    out, _ = tiny_build
    model = AutoModelForCausalLM.from_pretrained(out)
    model.save_pretrained(tmp_path / "same")
    assert weights_checksum(tmp_path / "same") == weights_checksum(out)
    with torch.no_grad():
        weight = model.model.layers[0].mlp.up_proj.weight
        weight[0, 0] = torch.nextafter(weight[0, 0], torch.tensor(float("inf")))  # one ulp
    model.save_pretrained(tmp_path / "changed")
    assert weights_checksum(tmp_path / "changed") != weights_checksum(out)
    with pytest.raises(FileNotFoundError, match="no \\*.safetensors weights"):
        weights_checksum(tmp_path)


def test_baked_temperature_only_scales_the_logits():
    plain = pretrain(TinyCoderConfig(**{**TINY, "bake_temperature": 1.0}), seed=0, progress=False)
    baked = pretrain(TinyCoderConfig(**{**TINY, "bake_temperature": 0.5}), seed=0, progress=False)
    assert plain.losses == baked.losses  # same training; the scaling comes after
    ids = torch.tensor([plain.tokenizer(plain.heldout[0].prompt).input_ids])
    with torch.no_grad():
        assert torch.allclose(baked.model(ids).logits, 2 * plain.model(ids).logits, atol=1e-4)
    assert baked.heldout_perplexity_unbaked == pytest.approx(plain.heldout_perplexity)
    assert baked.heldout_perplexity != pytest.approx(plain.heldout_perplexity)
    # The baked perplexity is that of the saved (scaled) model.
    assert body_perplexity(baked.model, baked.tokenizer, baked.heldout, 256) == pytest.approx(baked.heldout_perplexity, rel=1e-4)


def test_short_training_prompts_keep_what_the_body_depends_on(corpus):
    for s in corpus[:50]:
        short = short_prompt(s.prompt)
        assert short.startswith("# x_train: float array of shape") and short.endswith(DEF)
        assert s.prompt.endswith(short) and len(short) < len(s.prompt)
        assert ("# Your previous build_model failed:" in short) == s.reflection


def _counting_pretrain(monkeypatch):
    calls = []
    real = build_module.pretrain

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(build_module, "pretrain", counted)
    return calls


def test_ensure_builds_once_then_reuses(tmp_path, monkeypatch):
    calls = _counting_pretrain(monkeypatch)
    stale = tmp_path / f".{checkpoint_dir(tmp_path, seed=0, **TINY).name}.building-killed"
    stale.mkdir()  # what a killed build leaves behind
    path = ensure_tiny_coder(tmp_path, seed=0, progress=False, **TINY)
    assert not stale.exists()
    assert path.parent == tmp_path and path.name.startswith("tiny-sklearn-coder-0-") and len(calls) == 1
    info, mtime = (path / "build_info.json").read_text(), (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_tiny_coder(tmp_path, seed=0, progress=False, **TINY) == path
    assert len(calls) == 1
    assert (path / "build_info.json").read_text() == info and (path / "model.safetensors").stat().st_mtime_ns == mtime
    assert [p.name for p in tmp_path.iterdir() if ".building-" in p.name] == []
    # The CLI finds the same checkpoint without building.
    cli_main(["--cache-dir", str(tmp_path), "--quiet", *[f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]])
    assert len(calls) == 1
    # A build that never finished (no marker) is redone; so is an explicit rebuild.
    (path / ".complete").unlink()
    assert ensure_tiny_coder(tmp_path, seed=0, progress=False, **TINY) == path and len(calls) == 2
    assert (path / ".complete").is_file()
    ensure_tiny_coder(tmp_path, seed=0, rebuild=True, progress=False, **TINY)
    assert len(calls) == 3


def test_concurrent_ensure_builds_only_once(tmp_path, monkeypatch):
    calls = _counting_pretrain(monkeypatch)
    paths = []
    threads = [threading.Thread(target=lambda: paths.append(ensure_tiny_coder(tmp_path, seed=2, progress=False, **TINY)))
               for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and len(paths) == 2 and paths[0] == paths[1]
    assert AutoModelForCausalLM.from_pretrained(paths[0]) is not None


def test_cache_location(monkeypatch, tmp_path):
    monkeypatch.setenv("ETPO_CACHE_DIR", str(tmp_path / "env"))
    assert checkpoint_dir(seed=5) == tmp_path / "env" / "tiny-sklearn-coder-5"
    assert checkpoint_dir(tmp_path, seed=5, steps=20).name.startswith("tiny-sklearn-coder-5-")
    assert checkpoint_dir(tmp_path, seed=5, steps=20) != checkpoint_dir(tmp_path, seed=5, steps=21)
    assert checkpoint_dir(tmp_path, seed=5, steps=TinyCoderConfig().steps) == tmp_path / "tiny-sklearn-coder-5"
    monkeypatch.delenv("ETPO_CACHE_DIR")
    assert str(checkpoint_dir(seed=0)).endswith(".cache/etpo_lightning/tiny-sklearn-coder-0")
    with pytest.raises(TypeError, match="stepz"):
        ensure_tiny_coder(tmp_path, stepz=3)


def test_cli_builds_into_out_and_records_the_command(tmp_path, capsys):
    out = tmp_path / "out"
    flags = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    cli_main(["--out", str(out), "--quiet", "--threads", "1", *flags])
    printed = capsys.readouterr().out.splitlines()
    assert printed[0] == str(out) and not (tmp_path / ".cache").exists()
    summary, info = json.loads(printed[1]), json.loads((out / "build_info.json").read_text())
    assert summary["weights_sha256"] == info["weights_sha256"] == weights_checksum(out)
    assert summary["shipped"] == "other seed or options: not comparable"
    assert info["command"].startswith("python -m etpo_lightning.tiny_coder --out ") and "--threads 1" in info["command"]
    assert info["reproducible_with"]["torch_threads"] == 1


# --------------------------------------------------------------------------- the shipped model

def test_shipped_model_is_the_build_its_build_info_records():
    info = shipped_build_info()
    assert info["seed"] == 0 and info["config"] == TinyCoderConfig().to_dict()
    assert weights_checksum(SHIPPED_DIR) == info["weights_sha256"]
    env = info["reproducible_with"]
    assert set(REPRODUCIBILITY_KEYS) <= set(env) and env["cpu_capability"] in ("AVX2", "AVX512", "DEFAULT")
    assert info["command"].startswith(("python -m etpo_lightning.tiny_coder", "ATEN_CPU_CAPABILITY="))
    model = AutoModelForCausalLM.from_pretrained(SHIPPED_DIR).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and sum(p.numel() for p in model.parameters()) == info["n_params"]
    tok = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    assert (len(tok), tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.padding_side) == (1024, 0, 1, 2, "left")
    gen = model.generation_config
    assert (gen.eos_token_id, gen.pad_token_id, gen.do_sample, gen.top_k, gen.top_p) == (2, 0, True, 0, 1.0)
    # The held-out texts shipped beside it are the build's, and its perplexity on them is the
    # recorded one (an independent check that the weights are the trained model's).
    held = load_samples(SHIPPED_DIR / "heldout.jsonl")
    assert held == heldout_samples(seed=0) and len(held) == info["n_heldout_samples"]
    config = TinyCoderConfig()
    ppl = body_perplexity(model, tok, held, config.max_length, config.eval_batch_size)
    assert ppl == pytest.approx(info["heldout_body_perplexity"], rel=1e-4) and ppl < 2.0


def test_shipped_tokenizer_round_trips():
    tok = AutoTokenizer.from_pretrained(SHIPPED_DIR)
    texts = [s.prompt + s.body for s in load_samples(SHIPPED_DIR / "heldout.jsonl")[:20]]
    texts += ["    m = KNeighborsClassifier(n_neighbors=7)  # é ü 漢字 \t tabs\n", ""]
    for text in texts:
        ids = tok(text, add_special_tokens=False).input_ids
        assert tok.decode(ids) == text
    # Identifiers with their '=' stay one token (the pre-tokenizer's rule).
    assert len(tok("n_estimators=", add_special_tokens=False).input_ids) == 1


def test_alias_loads_the_shipped_files_without_building(tmp_path, monkeypatch):
    monkeypatch.setenv("ETPO_CACHE_DIR", str(tmp_path))
    assert resolve_model_path("tiny-sklearn-coder") == str(SHIPPED_DIR)
    tok = load_tokenizer("tiny-sklearn-coder")
    assert tok.padding_side == "left" and tok.pad_token_id == 0
    model = load_causal_lm("tiny-sklearn-coder")
    shipped = AutoModelForCausalLM.from_pretrained(SHIPPED_DIR).state_dict()
    assert all(torch.equal(t, shipped[k]) for k, t in model.state_dict().items())
    assert list(tmp_path.iterdir()) == []  # nothing built, nothing cached


def test_alias_registry(tmp_path, monkeypatch):
    monkeypatch.setattr(model_aliases, "_ALIASES", dict(model_aliases._ALIASES))
    model_aliases.register_model_alias("here", lambda: tmp_path)
    model_aliases.register_model_alias("shipped-too", "etpo_lightning.tiny_coder.shipped:model_dir")
    assert resolve_model_path("here") == str(tmp_path)
    assert resolve_model_path("shipped-too") == str(SHIPPED_DIR)
    assert resolve_model_path("gpt2") == "gpt2" and resolve_model_path("./x") == "./x"
    assert {"here", "shipped-too", "tiny-sklearn-coder"} <= set(model_aliases.model_aliases())
    with pytest.raises(ValueError, match="package.module:function"):
        model_aliases.register_model_alias("bad", "etpo_lightning.tiny_coder.shipped")
    # A name that loads nothing gets an error listing the aliases (no hub lookup here: offline).
    message = str(models._friendly_oserror("no-such-model", OSError("not found")))
    assert message.startswith("model_name_or_path='no-such-model': ") and "'here', 'shipped-too', 'tiny-sklearn-coder'" in message


_ROOT = Path(__file__).resolve().parents[1]


def test_core_does_not_import_the_model_providers():
    """core resolves the alias by a registered name: no import of tiny_coder or envs, written
    or made when the package and core's model loading are imported."""
    for file in (_ROOT / "etpo_lightning" / "core").glob("*.py"):
        for node in ast.walk(ast.parse(file.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith(("etpo_lightning.tiny_coder", "etpo_lightning.envs")), (file.name, name)
    code = ("import sys, etpo_lightning, etpo_lightning.core.models; "
            "print([m for m in sys.modules if m.startswith(('etpo_lightning.tiny_coder', 'etpo_lightning.envs'))])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=_ROOT)
    assert out.stdout.strip() == "[]"


def test_modules_default_to_the_shipped_model_in_a_fresh_interpreter(tmp_path):
    code = ("from etpo_lightning import PPOModule; m = PPOModule(); m.configure_model(); "
            "print(m.policy.config._name_or_path)")
    env = {**os.environ, "ETPO_CACHE_DIR": str(tmp_path), "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=_ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().splitlines()[-1] == str(SHIPPED_DIR) and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- the real thing

@pytest.fixture(scope="module")
def rebuild(tmp_path_factory):
    """The default model rebuilt by the CLI as the shipped one was: same threads, and the
    shipped build's ``ATEN_CPU_CAPABILITY`` and ``MKL_ENABLE_INSTRUCTIONS`` (a newer CPU can
    match an older one's kernels)."""
    shipped = shipped_build_info()["reproducible_with"]
    out = tmp_path_factory.mktemp("rebuild") / "model"
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_ENABLE_INSTRUCTIONS")}
    env["ATEN_CPU_CAPABILITY"] = shipped.get("aten_cpu_capability_env") or shipped["cpu_capability"].lower()
    if shipped.get("mkl_enable_instructions_env"):
        env["MKL_ENABLE_INSTRUCTIONS"] = shipped["mkl_enable_instructions_env"]
    subprocess.run([sys.executable, "-m", "etpo_lightning.tiny_coder", "--out", str(out), "--quiet",
                    "--threads", str(shipped["torch_threads"])], check=True, env=env, cwd=_ROOT)
    return out


@pytest.mark.slow
def test_rebuild_reproduces_the_shipped_model(rebuild):
    here, shipped = json.loads((rebuild / "build_info.json").read_text()), shipped_build_info()
    unlike = {k: (here["reproducible_with"][k], shipped["reproducible_with"][k]) for k in REPRODUCIBILITY_KEYS
              if here["reproducible_with"][k] != shipped["reproducible_with"][k]}
    if unlike:
        pytest.skip(f"this machine cannot build under the shipped build's conditions (here, shipped): {unlike}")
    assert weights_checksum(rebuild) == shipped["weights_sha256"] == here["weights_sha256"]
    assert (rebuild / "tokenizer.json").read_text() == (SHIPPED_DIR / "tokenizer.json").read_text()
    assert here["losses"] == shipped["losses"]


@pytest.mark.slow
def test_default_build_writes_code_that_parses(rebuild):
    path = rebuild
    info = json.loads((path / "build_info.json").read_text())
    assert info["final_loss"] < 1.0 and info["heldout_body_perplexity"] < 2.0
    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tok = AutoTokenizer.from_pretrained(path)
    prompt = render_task_prompt("breast_cancer - diagnose malignant vs benign tumours", (455, 30), 2)
    bodies = sample_bodies(model, tok, prompt, n=32, seed=0)
    assert sum(ended for _, ended in bodies) >= 30
    assert sum(parses(b) for b, _ in bodies) >= 0.8 * len(bodies)
    assert len({estimator_name(b) for b, _ in bodies}) >= 6
