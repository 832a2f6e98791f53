"""Tabular classification datasets for the data-science coding environment.

Every dataset exposes the same small surface: ``x`` (a 2-D float64 array without NaN),
``y`` (int64 labels ``0..n_classes-1``), ``name``, ``n_classes`` and ``description()``,
a one-line summary that goes into the prompt. The policies that turn a messy CSV into
that shape are documented on :class:`CSVDataset` and in ``docs/environments.md``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np

#: The datasets that ship inside scikit-learn (no download needed).
SKLEARN_LOADERS = ("breast_cancer", "wine", "iris", "digits")

#: Spellings of booleans that CSV columns often use (compared lower-cased, stripped).
_TRUE_TOKENS = frozenset({"true", "t", "yes", "y"})
_FALSE_TOKENS = frozenset({"false", "f", "no", "n"})


class TabularDataset:
    """A classification dataset: features ``x`` (float64, no NaN) and labels ``y`` (0..k-1).

    Args:
        name: short name used in prompts and logs.
        x: feature matrix, shape ``(n_samples, n_features)``.
        y: labels, shape ``(n_samples,)``; any values, they are label-encoded here.
        feature_names: one name per column of ``x`` (defaults to ``f0, f1, ...``).
        class_names: display names of the classes in label order (defaults to the
            original label values).
        notes: extra text for :meth:`description` (how the data was prepared).
    """

    def __init__(
        self,
        name: str,
        x: np.ndarray,
        y: np.ndarray,
        feature_names: Sequence[str] | None = None,
        class_names: Sequence[str] | None = None,
        notes: str = "",
    ) -> None:
        x = np.asarray(x, dtype=np.float64)
        if x.ndim != 2:
            raise ValueError(f"{name}: x must be 2-D, got shape {x.shape}")
        if x.shape[1] == 0:
            raise ValueError(f"{name}: no feature columns")
        if not np.all(np.isfinite(x)):
            raise ValueError(f"{name}: x contains NaN or infinite values; impute them first")
        labels, y_codes = np.unique(np.asarray(y), return_inverse=True)
        if len(y_codes) != len(x):
            raise ValueError(f"{name}: x has {len(x)} rows but y has {len(y_codes)}")
        if len(labels) < 2:
            only = labels[0] if len(labels) else None
            raise ValueError(f"{name}: the target has a single class ({only!r}); need at least 2 classes")
        self.name = name
        self.x = np.ascontiguousarray(x)
        self.y = y_codes.astype(np.int64)
        self.feature_names = list(feature_names) if feature_names is not None else [f"f{i}" for i in range(x.shape[1])]
        if len(self.feature_names) != x.shape[1]:
            raise ValueError(f"{name}: {len(self.feature_names)} feature names for {x.shape[1]} columns")
        self.class_names = [str(c) for c in (class_names if class_names is not None else labels)]
        self.notes = notes

    @property
    def n_classes(self) -> int:
        """Number of distinct labels."""
        return len(self.class_names)

    @property
    def n_samples(self) -> int:
        return int(self.x.shape[0])

    @property
    def n_features(self) -> int:
        return int(self.x.shape[1])

    def description(self) -> str:
        """One line for the prompt: name, rows, features, classes and preparation notes."""
        classes = ", ".join(self.class_names[:10]) + (", ..." if self.n_classes > 10 else "")
        text = (
            f"{self.name}: {self.n_samples} rows, {self.n_features} numeric features, "
            f"{self.n_classes} classes ({classes})."
        )
        if self.notes:
            text += " " + self.notes
        # The prompt puts the description on a '#' comment line: it must stay one line.
        return " ".join(text.split())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.description()!r})"


class SklearnDataset(TabularDataset):
    """A dataset that ships with scikit-learn: ``breast_cancer``, ``wine``, ``iris`` or ``digits``."""

    def __init__(self, name: str) -> None:
        from sklearn import datasets as skd

        loaders = {
            "breast_cancer": skd.load_breast_cancer,
            "wine": skd.load_wine,
            "iris": skd.load_iris,
            "digits": skd.load_digits,
        }
        if name not in loaders:
            raise ValueError(f"unknown sklearn dataset {name!r}; choose one of {list(SKLEARN_LOADERS)}")
        bunch = loaders[name]()
        names = getattr(bunch, "target_names", None)
        super().__init__(
            name=name,
            x=bunch.data,
            y=bunch.target,
            feature_names=[str(f) for f in getattr(bunch, "feature_names", [])] or None,
            class_names=[str(c) for c in names] if names is not None else None,
        )


class SyntheticDataset(TabularDataset):
    """An offline dataset where the choice of model and preprocessing matters a lot.

    ``kind="quickstart"`` (the CPU quickstart task), built with a fixed seed:

    * two signal features whose classes form an XOR pattern (label = sign(a) xor sign(b),
      3% label noise) -- invisible to linear models and to Gaussian naive Bayes;
    * one weak linear feature (class-shifted Gaussian) so linear models get a little signal;
    * four pure-noise features;
    * wildly different scales: the XOR features are multiplied by 1e-3 and the noise
      features by 1e3, so distance-based models (KNN, RBF-SVC) without scaling only see
      noise, while the same models after ``StandardScaler`` do well.

    Typical protocol AUCs (see the docs): unscaled KNN/SVC ~0.5, linear models and
    GaussianNB ~0.65, a decision tree ~0.7, scaled KNN/SVC and random forests ~0.85,
    gradient boosting ~0.94.

    ``kind="circles"`` and ``kind="moons"`` replace the XOR pair by concentric circles or
    two moons (same noise features and scales, no linear feature).
    """

    KINDS = ("quickstart", "circles", "moons")

    def __init__(self, kind: str = "quickstart", n_samples: int = 400, seed: int = 0) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown SyntheticDataset kind {kind!r}; choose one of {list(self.KINDS)}")
        if n_samples < 20:
            raise ValueError(f"n_samples must be >= 20, got {n_samples}")
        rng = np.random.default_rng(seed)
        n_noise = 4
        if kind == "quickstart":
            signal = rng.uniform(-1.0, 1.0, size=(n_samples, 2))
            y = ((signal[:, 0] > 0) ^ (signal[:, 1] > 0)).astype(np.int64)
            flip = rng.random(n_samples) < 0.03
            y = np.where(flip, 1 - y, y)
            linear = rng.normal(size=n_samples) + 0.3 * (2 * y - 1)
            columns = [signal, linear[:, None]]
            scales = [1e-3, 1e-3, 1.0]
            names = ["xor_a", "xor_b", "weak_linear"]
        else:
            from sklearn.datasets import make_circles, make_moons

            rs = int(rng.integers(0, 2**31 - 1))
            if kind == "circles":
                signal, y = make_circles(n_samples=n_samples, noise=0.1, factor=0.5, random_state=rs)
            else:
                signal, y = make_moons(n_samples=n_samples, noise=0.3, random_state=rs)
            columns = [signal]
            scales = [1e-3, 1e-3]
            names = [f"{kind}_a", f"{kind}_b"]
        columns.append(rng.normal(size=(n_samples, n_noise)))
        scales += [1e3] * n_noise
        names += [f"noise_{i}" for i in range(n_noise)]
        x = np.column_stack(columns) * np.asarray(scales)
        super().__init__(
            name=f"synthetic_{kind}",
            x=x,
            y=y,
            feature_names=names,
        )
        self.kind = kind
        self.seed = seed


class CSVDataset(TabularDataset):
    """A classification dataset read from a CSV file with pandas.

    Column policy (in this order):

    * ``drop`` columns (ids, leaks) are removed; rows whose target is missing are removed.
    * Boolean columns -- real booleans, or text whose values are all one of
      true/false, t/f, yes/no, y/n (any case) -- become 0/1.
    * Text columns whose non-missing values parse as numbers (at least 90% of them) become
      numeric; the values that do not parse count as missing.
    * Other text columns with at most ``max_categories`` distinct values are one-hot encoded
      (one 0/1 column per value, named ``column=value``; a missing value is all zeros).
      Text columns with more distinct values (names, free text, dates) are dropped.
    * Constant columns (one value, or all missing) are dropped.
    * Missing numeric values (NaN, empty cells, +-inf) are replaced by the column median
      computed on the whole file, and a 0/1 indicator column ``column__missing`` is added
      for every column that had a missing value. So ``x`` never contains NaN and naive
      scikit-learn code works; the indicator keeps the "was missing" signal.
    * The target is label-encoded in sorted order of its values.

    ``max_rows`` keeps a random subset of rows (``random_state``), in file order.

    Raises:
        ValueError: the file cannot be read, the target (or a ``drop`` column) does not
            exist, the target has a single class, or no usable feature column is left.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        target: str,
        drop: Sequence[str] = (),
        max_rows: int | None = None,
        random_state: int = 0,
        max_categories: int = 20,
        name: str | None = None,
    ) -> None:
        import pandas as pd

        path = os.fspath(path)
        try:
            frame = pd.read_csv(path)
        except (OSError, UnicodeDecodeError, ValueError, pd.errors.ParserError) as exc:
            # pandas raises EmptyDataError (a ValueError) for empty files.
            raise ValueError(f"cannot read CSV file {path!r}: {type(exc).__name__}: {exc}") from exc
        columns = [str(c) for c in frame.columns]
        frame.columns = columns
        if target not in columns:
            raise ValueError(f"target column {target!r} not found in {path!r}; available columns: {columns}")
        missing_drop = [c for c in drop if c not in columns]
        if missing_drop:
            raise ValueError(f"drop column(s) {missing_drop} not found in {path!r}; available columns: {columns}")
        frame = frame.drop(columns=list(drop))
        n_read = len(frame)
        frame = frame[frame[target].notna()]
        n_no_target = n_read - len(frame)
        if max_rows is not None and len(frame) > max_rows:
            frame = frame.sample(n=int(max_rows), random_state=random_state).sort_index()
        if len(frame) == 0:
            raise ValueError(f"{path!r} has no rows with a value in target column {target!r}")

        target_values = frame[target]
        if target_values.nunique() < 2:
            raise ValueError(
                f"target column {target!r} in {path!r} has a single class "
                f"({target_values.iloc[0]!r}); need at least 2 classes"
            )
        # Mixed types (e.g. 1 and "1") would not sort: compare as text unless all numeric.
        if not pd.api.types.is_numeric_dtype(target_values) and not pd.api.types.is_bool_dtype(target_values):
            target_values = target_values.astype(str)
        labels, y = np.unique(target_values.to_numpy(), return_inverse=True)

        features, feature_names, report = _encode_features(frame.drop(columns=[target]), max_categories)
        if not features:
            reasons = "; ".join(f"{c}: {why}" for c, why in report["dropped"]) or "no columns besides the target"
            raise ValueError(f"no usable feature columns left in {path!r} ({reasons})")
        x = np.column_stack(features).astype(np.float64)

        notes = _notes(report, n_no_target)
        super().__init__(
            name=name or os.path.basename(path),
            x=x,
            y=y,
            feature_names=feature_names,
            class_names=[str(v) for v in labels],
            notes=notes,
        )
        self.path = path
        self.target = target
        #: What happened to each column: ``{"numeric": [...], "boolean": [...], "one_hot": [...],
        #: "imputed": [...], "dropped": [(column, reason), ...]}``.
        self.encoding_report = report


def _as_boolean(series) -> "np.ndarray | None":
    """0/1 floats (NaN for missing) when every non-missing value is a boolean spelling."""
    import pandas as pd

    values = series.dropna()
    if pd.api.types.is_bool_dtype(series.dtype):
        return series.astype("float64").to_numpy()
    if len(values) == 0:
        return None
    if all(isinstance(v, (bool, np.bool_)) for v in values):
        return series.map(lambda v: np.nan if pd.isna(v) else float(bool(v))).to_numpy(dtype=np.float64)
    if not all(isinstance(v, str) for v in values):
        return None
    tokens = {v.strip().lower() for v in values}
    if not tokens <= (_TRUE_TOKENS | _FALSE_TOKENS):
        return None

    def to_float(v: object) -> float:
        if not isinstance(v, str):
            return np.nan
        return 1.0 if v.strip().lower() in _TRUE_TOKENS else 0.0

    return series.map(to_float).to_numpy(dtype=np.float64)


def _encode_features(frame, max_categories: int) -> tuple[list[np.ndarray], list[str], dict]:
    """Apply the column policy of :class:`CSVDataset`; return columns, names and a report."""
    import pandas as pd

    report: dict[str, list] = {"numeric": [], "boolean": [], "one_hot": [], "imputed": [], "dropped": []}
    out: list[np.ndarray] = []
    names: list[str] = []
    indicators: list[tuple[str, np.ndarray]] = []

    def add_numeric(column: str, values: np.ndarray) -> None:
        values = values.astype(np.float64)
        values[~np.isfinite(values)] = np.nan
        missing = np.isnan(values)
        present = values[~missing]
        if len(present) == 0 or np.all(present == present[0]):
            report["dropped"].append((column, "constant or empty"))
            return
        if missing.any():
            values = np.where(missing, np.median(present), values)
            indicators.append((f"{column}__missing", missing.astype(np.float64)))
            report["imputed"].append(column)
        out.append(values)
        names.append(column)

    for column in frame.columns:
        series = frame[column]
        as_bool = _as_boolean(series)
        if as_bool is not None:
            report["boolean"].append(column)
            add_numeric(column, as_bool)
            continue
        if pd.api.types.is_numeric_dtype(series.dtype):
            report["numeric"].append(column)
            add_numeric(column, series.to_numpy(dtype=np.float64, na_value=np.nan))
            continue
        present = series.dropna()
        if len(present) == 0:
            report["dropped"].append((column, "constant or empty"))
            continue
        parsed = pd.to_numeric(present.astype(str).str.strip(), errors="coerce")
        if parsed.notna().mean() >= 0.9:
            report["numeric"].append(column)
            values = pd.to_numeric(series.astype(str).str.strip(), errors="coerce").to_numpy(dtype=np.float64)
            values[series.isna().to_numpy()] = np.nan
            add_numeric(column, values)
            continue
        text = present.astype(str).str.strip()
        categories = sorted(text.unique())
        if len(categories) < 2:
            report["dropped"].append((column, "constant or empty"))
            continue
        if len(categories) > max_categories:
            report["dropped"].append((column, f"text with {len(categories)} distinct values (> {max_categories})"))
            continue
        stripped = series.map(lambda v: v.strip() if isinstance(v, str) else (None if pd.isna(v) else str(v)))
        for category in categories:
            out.append((stripped == category).to_numpy(dtype=np.float64))
            names.append(f"{column}={category}")
        report["one_hot"].append(column)

    for name, column in indicators:
        out.append(column)
        names.append(name)
    return out, names, report


def _short_list(items: Sequence[str], limit: int = 5) -> str:
    """``a, b, c`` or ``a, b, c, ... (12 columns)`` so the prompt line stays short."""
    items = list(items)
    if len(items) <= limit:
        return ", ".join(items)
    return ", ".join(items[:limit]) + f", ... ({len(items)} columns)"


def _notes(report: dict, n_no_target: int) -> str:
    parts = []
    if report["one_hot"]:
        parts.append(f"one-hot encoded: {_short_list(report['one_hot'])}")
    if report["boolean"]:
        parts.append(f"booleans as 0/1: {_short_list(report['boolean'])}")
    if report["imputed"]:
        parts.append(f"missing values median-imputed with a __missing indicator: {_short_list(report['imputed'])}")
    if report["dropped"]:
        parts.append(f"dropped: {_short_list([c for c, _ in report['dropped']])}")
    if n_no_target:
        parts.append(f"{n_no_target} rows without a target removed")
    return "; ".join(parts) + ("." if parts else "")
