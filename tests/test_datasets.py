"""Datasets: sklearn loaders, the synthetic quickstart data, and messy CSV files."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import train_test_split
from sklearn.neighbors import KNeighborsClassifier
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from etpo_lightning.envs import CSVDataset, DataScienceCodingEnv, Sandbox, SklearnDataset, SyntheticDataset


@pytest.fixture(scope="session", autouse=True)
def warm_sandbox():
    """Keep the default sandbox executor warm for the session: test modules share it."""
    with Sandbox() as sandbox:
        sandbox.start()
        yield sandbox


def protocol(x, y, make_model) -> float:
    scores = []
    for i in range(5):
        x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.5, random_state=i, shuffle=True)
        scores.append(roc_auc_score(y_te, make_model().fit(x_tr, y_tr).predict_proba(x_te)[:, 1]))
    return float(np.mean(scores))


@pytest.mark.parametrize(
    "name, shape, n_classes",
    [("breast_cancer", (569, 30), 2), ("wine", (178, 13), 3), ("iris", (150, 4), 3), ("digits", (1797, 64), 10)],
)
def test_sklearn_datasets(name, shape, n_classes):
    ds = SklearnDataset(name)
    assert ds.x.shape == shape and ds.x.dtype == np.float64
    assert ds.n_classes == n_classes and ds.y.dtype == np.int64
    assert sorted(np.unique(ds.y)) == list(range(n_classes))
    desc = ds.description()
    assert desc.startswith(f"{name}: {shape[0]} rows, {shape[1]} numeric features, {n_classes} classes")
    assert "\n" not in desc


def test_unknown_sklearn_dataset():
    with pytest.raises(ValueError, match="unknown sklearn dataset 'mnist'"):
        SklearnDataset("mnist")


def test_synthetic_dataset_is_deterministic_and_discriminates_programs():
    a, b = SyntheticDataset(seed=0), SyntheticDataset(seed=0)
    assert np.array_equal(a.x, b.x) and np.array_equal(a.y, b.y)
    assert not np.array_equal(SyntheticDataset(seed=1).x, a.x)
    assert a.x.shape == (400, 7) and a.n_classes == 2
    assert 0.4 < a.y.mean() < 0.6
    # Scales differ by six orders of magnitude between signal and noise columns.
    stds = a.x.std(axis=0)
    assert stds[:2].max() < 1e-2 and stds[3:].min() > 1e2
    knn = protocol(a.x, a.y, KNeighborsClassifier)
    scaled_knn = protocol(a.x, a.y, lambda: make_pipeline(StandardScaler(), KNeighborsClassifier()))
    linear = protocol(a.x, a.y, lambda: LogisticRegression(max_iter=1000))
    assert knn < 0.6 and linear < 0.75 and scaled_knn > 0.8


@pytest.mark.parametrize("kind", ["circles", "moons"])
def test_synthetic_kinds(kind):
    ds = SyntheticDataset(kind=kind, n_samples=100, seed=3)
    assert ds.x.shape == (100, 6) and ds.n_classes == 2 and ds.name == f"synthetic_{kind}"


def write_messy_csv(path, n: int = 60) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    label = np.array(["sick", "healthy"])[rng.integers(0, 2, n)]
    age = rng.normal(50, 10, n).round(1)
    age[[3, 7]] = np.nan
    frame = pd.DataFrame(
        {
            "patient_id": np.arange(1000, 1000 + n),
            "age": age,
            "smoker": np.array(["yes", "no", "YES", "No"])[rng.integers(0, 4, n)],
            "insured": np.array([True, False], dtype=object)[rng.integers(0, 2, n)],
            "city": np.array(["Paris", "Lyon", "Nice"])[rng.integers(0, 3, n)],
            "comment": [f"note {i}" for i in range(n)],
            "dose": [str(v) for v in rng.integers(1, 5, n)],
            "constant": 7,
            "diagnosis": label,
        }
    )
    frame.loc[5, "city"] = None
    frame.loc[9, "dose"] = "n/a"
    frame.loc[11, "insured"] = None
    frame.to_csv(path, index=False)
    return frame


def test_messy_csv_encoding(tmp_path):
    path = tmp_path / "messy.csv"
    frame = write_messy_csv(path)
    ds = CSVDataset(path, target="diagnosis", drop=["patient_id"])
    assert ds.feature_names == [
        "age", "smoker", "insured", "city=Lyon", "city=Nice", "city=Paris", "dose",
        "age__missing", "insured__missing", "dose__missing",
    ]  # fmt: skip
    assert ds.x.shape == (60, 10) and np.isfinite(ds.x).all()
    col = {name: ds.x[:, j] for j, name in enumerate(ds.feature_names)}
    # Booleans (any spelling) -> 0/1.
    smoker_yes = frame["smoker"].str.lower().eq("yes").to_numpy(float)
    assert np.array_equal(col["smoker"], smoker_yes)
    # Missing numeric -> median of the present values, plus an indicator.
    assert col["age"][3] == col["age"][7] == np.nanmedian(frame["age"])
    assert col["age__missing"].sum() == 2 and col["age__missing"][3] == 1
    assert col["insured__missing"][11] == 1 and col["insured"][11] in (0.0, 1.0)
    # Text that is mostly numbers becomes numeric; "n/a" is missing.
    assert col["dose__missing"][9] == 1 and col["dose"][0] == float(frame["dose"][0])
    # Low-cardinality text -> one-hot, a missing value is all zeros.
    onehot = np.column_stack([col["city=Lyon"], col["city=Nice"], col["city=Paris"]])
    assert onehot[5].sum() == 0 and np.all(np.delete(onehot, 5, axis=0).sum(axis=1) == 1)
    assert np.array_equal(col["city=Paris"][:5], (frame["city"][:5] == "Paris").to_numpy(float))
    # Target label-encoded in sorted order.
    assert ds.class_names == ["healthy", "sick"]
    assert np.array_equal(ds.y, (frame["diagnosis"] == "sick").to_numpy(int))
    # High-cardinality text and constants are dropped, and the report says why.
    dropped = dict(ds.encoding_report["dropped"])
    assert set(dropped) == {"comment", "constant"} and "60 distinct values" in dropped["comment"]
    desc = ds.description()
    assert desc.startswith("messy.csv: 60 rows, 10 numeric features, 2 classes (healthy, sick).")
    assert "one-hot encoded: city" in desc and "median-imputed" in desc and "dropped: comment, constant" in desc


def test_messy_csv_scores_in_the_env(tmp_path):
    path = tmp_path / "messy.csv"
    write_messy_csv(path)
    ds = CSVDataset(path, target="diagnosis", drop=["patient_id"])
    expected = protocol(ds.x, ds.y, lambda: make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)))
    body = (
        "    from sklearn.pipeline import make_pipeline\n"
        "    from sklearn.preprocessing import StandardScaler\n"
        "    from sklearn.linear_model import LogisticRegression\n"
        "    return make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(x_train, y_train)\n"
    )
    with DataScienceCodingEnv(ds, timeout_s=20, memory_mb=1024) as env:
        obs = env.reset()
        assert "messy.csv: 60 rows" in obs and "(30, 10)" in obs
        assert env.hide_paths == (str(path),)
        _, reward, done, info = env.step(body)
    assert info["error"] is None and done
    assert abs(reward - expected) < 1e-9


def test_max_rows(tmp_path):
    path = tmp_path / "messy.csv"
    write_messy_csv(path)
    ds = CSVDataset(path, target="diagnosis", drop=["patient_id"], max_rows=25, random_state=1)
    again = CSVDataset(path, target="diagnosis", drop=["patient_id"], max_rows=25, random_state=1)
    assert ds.x.shape[0] == 25 and np.array_equal(ds.x, again.x)


def test_missing_target_names_it(tmp_path):
    path = tmp_path / "messy.csv"
    write_messy_csv(path)
    with pytest.raises(ValueError, match=r"target column 'label' not found .*available columns: \['patient_id', 'age'"):
        CSVDataset(path, target="label")
    with pytest.raises(ValueError, match=r"drop column\(s\) \['nope'\] not found"):
        CSVDataset(path, target="diagnosis", drop=["nope"])


def test_single_class(tmp_path):
    path = tmp_path / "one.csv"
    pd.DataFrame({"a": [1.0, 2.0, 3.0], "y": ["x", "x", "x"]}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"target column 'y' .* single class \('x'\)"):
        CSVDataset(path, target="y")


def test_nothing_usable_left(tmp_path):
    path = tmp_path / "text.csv"
    pd.DataFrame({"name": [f"n{i}" for i in range(30)], "k": [1] * 30, "y": [0, 1] * 15}).to_csv(path, index=False)
    with pytest.raises(ValueError, match=r"no usable feature columns .*name: text with 30 distinct values.*k: constant"):
        CSVDataset(path, target="y")


def test_unreadable_file(tmp_path):
    with pytest.raises(ValueError, match="cannot read CSV file"):
        CSVDataset(tmp_path / "missing.csv", target="y")
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    with pytest.raises(ValueError, match="cannot read CSV file"):
        CSVDataset(empty, target="y")
    binary = tmp_path / "binary.csv"
    binary.write_bytes(bytes(range(256)) * 10)
    with pytest.raises(ValueError):
        CSVDataset(binary, target="y")


def test_env_refuses_data_the_protocol_cannot_split(tmp_path):
    path = tmp_path / "rare.csv"
    pd.DataFrame({"a": np.arange(40.0), "y": [0] * 20 + [1] * 19 + [2]}).to_csv(path, index=False)
    ds = CSVDataset(path, target="y")
    with pytest.raises(ValueError, match="classes in its (train|test) half"):
        DataScienceCodingEnv(ds)
