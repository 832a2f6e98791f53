"""A small grammar of ``build_model`` bodies: sklearn estimators, preprocessing and code styles.

A :class:`Program` is a structured description of one body (which estimator with which
hyperparameters, which preprocessing, how it is assembled, fitted, imported and quoted);
:func:`~etpo_lightning.tiny_coder.render.render` (in ``render.py``) turns it into the
indented source the agent would write. Keeping the
structure lets :mod:`failures` break a program in a controlled way and know the error.

Choices are drawn roughly uniformly over estimator families and independently of the
preprocessing, so the corpus holds good programs (scaled SVC, boosted trees) next to
mediocre ones (unscaled KNN, plain naive Bayes): the pretrained model has no built-in
preference for the best choice and reinforcement learning has room to find it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from typing import Callable, Union

FIT_ARGS = "x_train, y_train"


@dataclass(frozen=True)
class Ctx:
    """What a body may depend on: the shape of the task."""

    n_rows: int
    n_features: int
    n_classes: int


@dataclass(frozen=True)
class Str:
    """A string literal; rendered with the program's quote character."""

    text: str


@dataclass(frozen=True)
class Call:
    """``cls(*args, **kwargs)`` where ``cls`` lives in ``module`` (a class or a function)."""

    cls: str
    module: str
    kwargs: tuple[tuple[str, "Value"], ...] = ()
    args: tuple["Value", ...] = ()

    def with_kwargs(self, kwargs: list[tuple[str, "Value"]]) -> "Call":
        return replace(self, kwargs=tuple(kwargs))


@dataclass(frozen=True)
class Named:
    """A list of ``(name, estimator)`` pairs, as VotingClassifier and StackingClassifier take."""

    items: tuple[tuple[str, Call], ...]


Value = Union[str, Str, Call, Named]


@dataclass(frozen=True)
class Program:
    """One ``build_model`` body, before rendering."""

    estimator: Call
    steps: tuple[Call, ...] = ()
    assemble: str = "bare"  # bare | make_pipeline | Pipeline | named
    finish: str = "fit_return"  # fit_return | chain_return | assign_chain
    imports: str = "from"  # from: ``from sklearn.x import A`` | module: ``from sklearn import x``
    var: str = "model"
    quote: str = '"'
    comment: str | None = None
    # Rendering overrides used by ``failures``: a class imported from another module, a
    # name written differently in the code than in the import, an import left out.
    import_module: dict[str, str] = field(default_factory=dict)
    import_name: dict[str, str] = field(default_factory=dict)
    code_name: dict[str, str] = field(default_factory=dict)
    skip_import: frozenset[str] = frozenset()

    @property
    def outer(self) -> str:
        """Class of the object the body returns."""
        return "Pipeline" if self.steps else self.estimator.cls


# --------------------------------------------------------------------------- sampling

def _pick(rng: random.Random, kwargs: list, p: float, key: str, choices: list[Value]) -> None:
    """Append ``key=choice`` with probability ``p``."""
    if rng.random() < p:
        kwargs.append((key, rng.choice(choices)))


def _seed(rng: random.Random, kwargs: list, p: float = 0.55) -> None:
    _pick(rng, kwargs, p, "random_state", ["0", "0", "42", "1", "7", "123"])


def _logreg(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.5, "C", ["0.01", "0.1", "0.3", "0.5", "1.0", "2.0", "5.0", "10.0"])
    _pick(rng, kw, 0.75, "max_iter", ["200", "500", "1000", "1000", "2000", "5000"])
    solvers = ["lbfgs", "newton-cg", "saga"] + (["liblinear"] if ctx.n_classes == 2 else [])
    _pick(rng, kw, 0.15, "solver", [Str(s) for s in solvers])
    _pick(rng, kw, 0.12, "class_weight", [Str("balanced")])
    return Call("LogisticRegression", "sklearn.linear_model", tuple(kw))


def _knn(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.8, "n_neighbors", ["3", "5", "5", "7", "9", "11", "15", "21", "31"])
    _pick(rng, kw, 0.35, "weights", [Str("uniform"), Str("distance")])
    _pick(rng, kw, 0.1, "p", ["1", "2"])
    return Call("KNeighborsClassifier", "sklearn.neighbors", tuple(kw))


def _svc(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.5, "C", ["0.1", "0.5", "1.0", "2.0", "5.0", "10.0"])
    _pick(rng, kw, 0.4, "kernel", [Str("rbf"), Str("rbf"), Str("linear"), Str("poly")])
    _pick(rng, kw, 0.2, "gamma", [Str("scale"), Str("auto"), "0.01", "0.1"])
    kw.insert(rng.choice([0, len(kw)]), ("probability", "True"))
    _seed(rng, kw, 0.3)
    return Call("SVC", "sklearn.svm", tuple(kw))


def _tree(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.7, "max_depth", ["3", "4", "5", "6", "8", "10", "None"])
    _pick(rng, kw, 0.35, "min_samples_leaf", ["1", "2", "5", "10", "20"])
    _pick(rng, kw, 0.25, "criterion", [Str("gini"), Str("entropy"), Str("log_loss")])
    _seed(rng, kw)
    return Call("DecisionTreeClassifier", "sklearn.tree", tuple(kw))


def _forest(cls: str) -> Callable[[random.Random, Ctx], Call]:
    def make(rng: random.Random, ctx: Ctx) -> Call:
        kw: list = []
        _pick(rng, kw, 0.8, "n_estimators", ["50", "100", "100", "200", "300", "500"])
        _pick(rng, kw, 0.35, "max_depth", ["None", "5", "8", "10", "15", "20"])
        _pick(rng, kw, 0.2, "min_samples_leaf", ["1", "2", "3", "5"])
        _pick(rng, kw, 0.2, "max_features", [Str("sqrt"), Str("log2"), "0.3", "0.5"])
        _pick(rng, kw, 0.1, "class_weight", [Str("balanced")])
        _pick(rng, kw, 0.2, "n_jobs", ["-1"])
        _seed(rng, kw, 0.6)
        return Call(cls, "sklearn.ensemble", tuple(kw))

    return make


def _gboost(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.7, "n_estimators", ["50", "100", "150", "200", "300"])
    _pick(rng, kw, 0.6, "learning_rate", ["0.01", "0.03", "0.05", "0.1", "0.2"])
    _pick(rng, kw, 0.45, "max_depth", ["2", "3", "4", "5"])
    _pick(rng, kw, 0.2, "subsample", ["0.7", "0.8", "1.0"])
    _seed(rng, kw)
    return Call("GradientBoostingClassifier", "sklearn.ensemble", tuple(kw))


def _hgb(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.6, "max_iter", ["100", "200", "300", "500"])
    _pick(rng, kw, 0.6, "learning_rate", ["0.03", "0.05", "0.1", "0.2"])
    _pick(rng, kw, 0.3, "max_leaf_nodes", ["15", "31", "63"])
    _pick(rng, kw, 0.2, "max_depth", ["None", "3", "5", "8"])
    _pick(rng, kw, 0.2, "l2_regularization", ["0.0", "0.1", "1.0"])
    _seed(rng, kw, 0.4)
    return Call("HistGradientBoostingClassifier", "sklearn.ensemble", tuple(kw))


def _adaboost(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    if rng.random() < 0.2:
        stump = Call("DecisionTreeClassifier", "sklearn.tree", (("max_depth", rng.choice(["1", "2", "3"])),))
        kw.append(("estimator", stump))
    _pick(rng, kw, 0.7, "n_estimators", ["50", "100", "200", "300"])
    _pick(rng, kw, 0.5, "learning_rate", ["0.05", "0.1", "0.5", "1.0"])
    _seed(rng, kw)
    return Call("AdaBoostClassifier", "sklearn.ensemble", tuple(kw))


def _gnb(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.2, "var_smoothing", ["1e-9", "1e-8", "1e-7", "1e-6"])
    return Call("GaussianNB", "sklearn.naive_bayes", tuple(kw))


def _mlp(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    sizes = ["(32,)", "(64,)", "(100,)", "(64, 32)", "(128, 64)", "(50, 50)"]
    _pick(rng, kw, 0.8, "hidden_layer_sizes", sizes)
    _pick(rng, kw, 0.7, "max_iter", ["200", "300", "500", "1000"])
    _pick(rng, kw, 0.25, "alpha", ["1e-4", "1e-3", "1e-2"])
    _pick(rng, kw, 0.12, "early_stopping", ["True"])
    _pick(rng, kw, 0.12, "learning_rate_init", ["0.001", "0.01"])
    _seed(rng, kw)
    return Call("MLPClassifier", "sklearn.neural_network", tuple(kw))


def _lda(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    if rng.random() < 0.3:
        kw = [("solver", Str("lsqr")), ("shrinkage", Str("auto"))]
    return Call("LinearDiscriminantAnalysis", "sklearn.discriminant_analysis", tuple(kw))


def _qda(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = []
    _pick(rng, kw, 0.5, "reg_param", ["0.0", "0.01", "0.1", "0.5"])
    return Call("QuadraticDiscriminantAnalysis", "sklearn.discriminant_analysis", tuple(kw))


def _sgd(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = [("loss", Str(rng.choice(["log_loss", "log_loss", "modified_huber"])))]
    _pick(rng, kw, 0.3, "alpha", ["1e-4", "1e-3", "1e-2"])
    _pick(rng, kw, 0.3, "max_iter", ["1000", "2000"])
    _seed(rng, kw, 0.4)
    return Call("SGDClassifier", "sklearn.linear_model", tuple(kw))


def _calibrated(rng: random.Random, ctx: Ctx) -> Call:
    inner: list = []
    _pick(rng, inner, 0.5, "C", ["0.1", "0.5", "1.0", "5.0"])
    kw: list = [("estimator", Call("LinearSVC", "sklearn.svm", tuple(inner)))]
    _pick(rng, kw, 0.5, "cv", ["3", "5"])
    return Call("CalibratedClassifierCV", "sklearn.calibration", tuple(kw))


# Ensemble members are kept short (at most one hyperparameter) so bodies stay short.
_MEMBERS: list[tuple[str, Callable[[random.Random, Ctx], Call]]] = [
    ("lr", _logreg),
    ("rf", _forest("RandomForestClassifier")),
    ("et", _forest("ExtraTreesClassifier")),
    ("nb", _gnb),
    ("knn", _knn),
    ("gb", _gboost),
    ("svc", _svc),
    ("dt", _tree),
]


def _member(rng: random.Random, ctx: Ctx, make: Callable[[random.Random, Ctx], Call]) -> Call:
    call = make(rng, ctx)
    keep = [kv for kv in call.kwargs if kv[0] in ("probability", "loss", "estimator")]
    others = [kv for kv in call.kwargs if kv not in keep]
    return call.with_kwargs(keep + others[:1])


def _members(rng: random.Random, ctx: Ctx, k: int) -> Named:
    chosen = rng.sample(_MEMBERS, k)
    return Named(tuple((name, _member(rng, ctx, make)) for name, make in chosen))


def _voting(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = [("estimators", _members(rng, ctx, rng.choice([2, 2, 3]))), ("voting", Str("soft"))]
    return Call("VotingClassifier", "sklearn.ensemble", tuple(kw))


def _bagging(rng: random.Random, ctx: Ctx) -> Call:
    base = rng.choice([_tree, _knn, _logreg, _gnb])
    kw: list = [("estimator", _member(rng, ctx, base))]
    _pick(rng, kw, 0.7, "n_estimators", ["10", "20", "50", "100"])
    _pick(rng, kw, 0.35, "max_samples", ["0.5", "0.7", "0.8", "1.0"])
    _pick(rng, kw, 0.15, "max_features", ["0.5", "0.8"])
    _seed(rng, kw)
    return Call("BaggingClassifier", "sklearn.ensemble", tuple(kw))


def _stacking(rng: random.Random, ctx: Ctx) -> Call:
    kw: list = [("estimators", _members(rng, ctx, 2))]
    if rng.random() < 0.7:
        kw.append(("final_estimator", Call("LogisticRegression", "sklearn.linear_model")))
    _pick(rng, kw, 0.3, "cv", ["3", "5"])
    return Call("StackingClassifier", "sklearn.ensemble", tuple(kw))


# (weight, maker): families are weighted about equally, whatever their usual quality.
FAMILIES: dict[str, tuple[float, Callable[[random.Random, Ctx], Call]]] = {
    "LogisticRegression": (1.0, _logreg),
    "KNeighborsClassifier": (1.0, _knn),
    "SVC": (1.0, _svc),
    "DecisionTreeClassifier": (1.0, _tree),
    "RandomForestClassifier": (1.0, _forest("RandomForestClassifier")),
    "ExtraTreesClassifier": (1.0, _forest("ExtraTreesClassifier")),
    "GradientBoostingClassifier": (1.0, _gboost),
    "HistGradientBoostingClassifier": (1.0, _hgb),
    "AdaBoostClassifier": (1.0, _adaboost),
    "GaussianNB": (1.0, _gnb),
    "MLPClassifier": (1.0, _mlp),
    "LinearDiscriminantAnalysis": (0.7, _lda),
    "QuadraticDiscriminantAnalysis": (0.6, _qda),
    "SGDClassifier": (0.6, _sgd),
    "CalibratedClassifierCV": (0.6, _calibrated),
    "VotingClassifier": (0.8, _voting),
    "BaggingClassifier": (0.7, _bagging),
    "StackingClassifier": (0.4, _stacking),
}

META = ("VotingClassifier", "StackingClassifier", "BaggingClassifier", "CalibratedClassifierCV")


def _kbest(rng: random.Random, ctx: Ctx) -> Call:
    k = rng.choice(["5", "10", "10", "15", "20"])
    value = rng.choice([k, f"min({k}, x_train.shape[1])"])
    return Call("SelectKBest", "sklearn.feature_selection", (("k", value),))


def _pca(rng: random.Random, ctx: Ctx) -> Call:
    n = rng.choice(["0.9", "0.95", "0.99", "min(10, x_train.shape[1])", "min(20, x_train.shape[1])"])
    kw: list = [("n_components", n)]
    _pick(rng, kw, 0.2, "whiten", ["True"])
    return Call("PCA", "sklearn.decomposition", tuple(kw))


# Preprocessing in canonical order: impute, expand, scale, select/reduce.
def _steps(rng: random.Random, ctx: Ctx) -> tuple[Call, ...]:
    r = rng.random()
    if r < 0.4:
        return ()
    steps: list[Call] = []
    if rng.random() < 0.2:
        steps.append(Call("SimpleImputer", "sklearn.impute", (("strategy", Str(rng.choice(["mean", "median"]))),)))
    if ctx.n_features <= 30 and rng.random() < 0.1:
        steps.append(Call("PolynomialFeatures", "sklearn.preprocessing", (("degree", "2"), ("include_bias", "False"))))
    if rng.random() < 0.8 or not steps:
        scaler = rng.choice(["StandardScaler"] * 5 + ["MinMaxScaler", "MinMaxScaler", "RobustScaler"])
        steps.append(Call(scaler, "sklearn.preprocessing"))
    if rng.random() < 0.2:
        steps.append(rng.choice([_kbest, _pca])(rng, ctx))
    return tuple(steps)


# Generic comments only: a comment that claims something about the model could be false.
_COMMENTS = [
    "a simple baseline",
    "fit on the full training set",
    "keep it fast",
    "probabilities are needed for ROC AUC",
    "build and fit the classifier",
]


def sample_program(rng: random.Random, ctx: Ctx) -> Program:
    """Draw one program: estimator family ~ uniform, preprocessing and style independent."""
    names = list(FAMILIES)
    family = rng.choices(names, weights=[FAMILIES[n][0] for n in names])[0]
    estimator = FAMILIES[family][1](rng, ctx)
    steps = _steps(rng, ctx)
    if steps:
        assemble = rng.choices(["make_pipeline", "Pipeline", "named"], weights=[3, 1, 2])[0]
    else:
        assemble = "bare"
    finish = rng.choices(["fit_return", "chain_return", "assign_chain"], weights=[6, 3, 1])[0]
    return Program(
        estimator=estimator,
        steps=steps,
        assemble=assemble,
        finish=finish,
        imports=rng.choices(["from", "module"], weights=[15, 1])[0],
        var=rng.choice(["model", "model", "model", "clf", "pipe", "estimator"]),
        # One quote style: mixing them buys no variety worth having and, for a model this
        # small, invites mismatched quotes.
        quote='"',
        comment=rng.choice(_COMMENTS) if rng.random() < 0.1 else None,
    )


def calls_in(program: Program) -> list[Call]:
    """Every call of the program in source order (nested ones after their parent)."""
    out: list[Call] = []

    def walk(v: Value) -> None:
        if isinstance(v, Call):
            out.append(v)
            for a in v.args:
                walk(a)
            for _, a in v.kwargs:
                walk(a)
        elif isinstance(v, Named):
            for _, c in v.items:
                walk(c)

    for s in program.steps:
        walk(s)
    walk(program.estimator)
    return out
