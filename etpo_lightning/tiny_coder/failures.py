"""Realistic ways a ``build_model`` body fails, each with the error the environment reports.

Every breaker takes a valid :class:`~etpo_lightning.tiny_coder.programs.Program` and returns
a broken body plus the error message ``"<ExceptionType>: <message>"`` that running it
(building, fitting, then calling ``predict_proba``) raises with the scikit-learn this was
written against. The messages feed the reflection prompts of the corpus, so the model sees
mistakes next to the error they cause; the tests execute samples of each kind to check them.
Syntax errors are compiled for real, so their message matches the running Python exactly.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from typing import Callable

from etpo_lightning.tiny_coder.programs import (
    FIT_ARGS,
    META,
    Call,
    Ctx,
    Program,
    Str,
    calls_in,
)
from etpo_lightning.tiny_coder.render import import_lines, indent, render_lines

FAILURE_KINDS = (
    "wrong_param",
    "bad_value",
    "missing_fit",
    "bad_import",
    "no_proba",
    "name_error",
    "wrong_return",
    "syntax",
)


@dataclass(frozen=True)
class Broken:
    """A failing body, its failure kind and the error it raises."""

    body: str
    kind: str
    error: str


# Keyword arguments that do not exist (typos, other libraries' names, removed sklearn API).
_BOGUS: dict[str, list[tuple[str, str]]] = {
    "LogisticRegression": [("max_iters", "1000"), ("multi_class", "'multinomial'"), ("lr", "0.01"), ("alpha", "1.0")],
    "KNeighborsClassifier": [("k", "5"), ("n_neighbours", "5"), ("neighbors", "7")],
    "SVC": [("kernal", "'rbf'"), ("probabilty", "True"), ("c", "1.0")],
    "DecisionTreeClassifier": [("depth", "5"), ("max_leaves", "20")],
    "RandomForestClassifier": [("n_trees", "100"), ("num_trees", "200"), ("max_depths", "10")],
    "ExtraTreesClassifier": [("n_trees", "100"), ("n_estimator", "200")],
    "GradientBoostingClassifier": [("lr", "0.1"), ("n_trees", "100"), ("num_boost_round", "100")],
    "HistGradientBoostingClassifier": [("n_estimators", "200"), ("num_leaves", "31"), ("lr", "0.1")],
    "AdaBoostClassifier": [("algorithm", "'SAMME.R'"), ("n_trees", "100")],
    "GaussianNB": [("alpha", "1.0"), ("smoothing", "1e-9")],
    "MLPClassifier": [("hidden_layers", "(64,)"), ("epochs", "200"), ("lr", "0.001")],
    "LinearDiscriminantAnalysis": [("reg_param", "0.1")],
    "QuadraticDiscriminantAnalysis": [("regularization", "0.1"), ("reg", "0.1")],
    "SGDClassifier": [("lr", "0.01"), ("epochs", "10")],
    "CalibratedClassifierCV": [("base_estimator", None)],
    "BaggingClassifier": [("base_estimator", None), ("n_models", "10")],
    "VotingClassifier": [("voting_type", "'soft'")],
    "StackingClassifier": [("meta_estimator", "None")],
    "StandardScaler": [("with_means", "False")],
    "MinMaxScaler": [("range", "(0, 1)")],
    "SimpleImputer": [("method", "'median'")],
    "PCA": [("n_component", "10")],
}

# (class, keyword, value) -> error; values that exist in other libraries or older sklearn.
# Sets of allowed values are written sorted (sklearn prints them in hash order).
_BAD_VALUES: dict[str, list[tuple[str, str, str]]] = {
    "RandomForestClassifier": [("max_features", "auto", "InvalidParameterError: The 'max_features' parameter of RandomForestClassifier must be an int in the range [1, inf), a float in the range (0.0, 1.0], a str among {'log2', 'sqrt'} or None. Got 'auto' instead.")],
    "ExtraTreesClassifier": [("max_features", "auto", "InvalidParameterError: The 'max_features' parameter of ExtraTreesClassifier must be an int in the range [1, inf), a float in the range (0.0, 1.0], a str among {'log2', 'sqrt'} or None. Got 'auto' instead.")],
    "GradientBoostingClassifier": [("loss", "deviance", "InvalidParameterError: The 'loss' parameter of GradientBoostingClassifier must be a str among {'exponential', 'log_loss'}. Got 'deviance' instead.")],
    "SGDClassifier": [("loss", "log", "InvalidParameterError: The 'loss' parameter of SGDClassifier must be a str among {'epsilon_insensitive', 'hinge', 'huber', 'log_loss', 'modified_huber', 'perceptron', 'squared_epsilon_insensitive', 'squared_error', 'squared_hinge'}. Got 'log' instead.")],
    "DecisionTreeClassifier": [("criterion", "mse", "InvalidParameterError: The 'criterion' parameter of DecisionTreeClassifier must be a str among {'entropy', 'gini', 'log_loss'}. Got 'mse' instead.")],
    "MLPClassifier": [("activation", "sigmoid", "InvalidParameterError: The 'activation' parameter of MLPClassifier must be a str among {'identity', 'logistic', 'relu', 'tanh'}. Got 'sigmoid' instead.")],
    "SVC": [("kernel", "gaussian", "InvalidParameterError: The 'kernel' parameter of SVC must be a str among {'linear', 'poly', 'precomputed', 'rbf', 'sigmoid'} or a callable. Got 'gaussian' instead.")],
    "KNeighborsClassifier": [("weights", "distanced", "InvalidParameterError: The 'weights' parameter of KNeighborsClassifier must be a str among {'distance', 'uniform'}, a callable or None. Got 'distanced' instead.")],
    "HistGradientBoostingClassifier": [("loss", "binary_crossentropy", "InvalidParameterError: The 'loss' parameter of HistGradientBoostingClassifier must be a str among {'log_loss'} or an instance of 'sklearn._loss.loss.BaseLoss'. Got 'binary_crossentropy' instead.")],
    "LinearDiscriminantAnalysis": [("shrinkage", "auto", "NotImplementedError: shrinkage not supported with 'svd' solver.")],
}
_LIBLINEAR_MULTICLASS = (
    "ValueError: The 'liblinear' solver does not support multiclass classification (n_classes >= 3). "
    "Either use another solver or wrap the estimator in a OneVsRestClassifier to keep applying a "
    "one-versus-rest scheme."
)

# Classes looked for in the wrong place; modules marked True exist (ImportError), others
# do not (ModuleNotFoundError).
_WRONG_MODULES: dict[str, list[str]] = {
    "LogisticRegression": ["sklearn.ensemble", "sklearn.linear"],
    "KNeighborsClassifier": ["sklearn.neighbours", "sklearn.ensemble"],
    "SVC": ["sklearn.linear_model", "sklearn.svc"],
    "GaussianNB": ["sklearn.bayes", "sklearn.linear_model"],
    "DecisionTreeClassifier": ["sklearn.trees", "sklearn.ensemble"],
    "RandomForestClassifier": ["sklearn.tree", "sklearn.forest"],
    "GradientBoostingClassifier": ["sklearn.boosting", "sklearn.tree"],
    "HistGradientBoostingClassifier": ["sklearn.experimental"],
    "MLPClassifier": ["sklearn.neural_networks", "sklearn.linear_model"],
    "LinearDiscriminantAnalysis": ["sklearn.lda", "sklearn.linear_model"],
    "SimpleImputer": ["sklearn.preprocessing"],
    "StandardScaler": ["sklearn.preprocessors", "sklearn.pipeline"],
    "PCA": ["sklearn.preprocessing", "sklearn.decompose"],
    "SelectKBest": ["sklearn.preprocessing"],
    "make_pipeline": ["sklearn.preprocessing", "sklearn.pipelines"],
    "Pipeline": ["sklearn.preprocessing"],
    "VotingClassifier": ["sklearn.model_selection"],
    "CalibratedClassifierCV": ["sklearn.svm"],
}
EXISTING_MODULES = frozenset({
    "sklearn.ensemble", "sklearn.linear_model", "sklearn.tree", "sklearn.preprocessing",
    "sklearn.pipeline", "sklearn.experimental", "sklearn.model_selection", "sklearn.svm",
})

# Misspelled or outdated class names.
_TYPOS: dict[str, list[str]] = {
    "RandomForestClassifier": ["RandomForestClassifer", "RandomForrestClassifier"],
    "KNeighborsClassifier": ["KNeighborClassifier", "KNNClassifier"],
    "LogisticRegression": ["LogisticRegresion", "LogisticClassifier"],
    "GradientBoostingClassifier": ["GradientBoostClassifier", "GradientBoostingClassifer"],
    "HistGradientBoostingClassifier": ["HistGradientBoostClassifier"],
    "DecisionTreeClassifier": ["DecisionTreeClassifer", "DecisionTree"],
    "ExtraTreesClassifier": ["ExtraTreeClassifier", "ExtraTreesClassifer"],
    "SVC": ["SVM", "SupportVectorClassifier"],
    "GaussianNB": ["GaussianNaiveBayes", "GaussianNb"],
    "MLPClassifier": ["MLPClassifer", "MLP"],
    "AdaBoostClassifier": ["AdaboostClassifier"],
    "StandardScaler": ["StandardScalar", "StdScaler"],
    "MinMaxScaler": ["MinMaxScalar"],
    "SimpleImputer": ["Imputer"],
    "PolynomialFeatures": ["PolynomialFeature"],
    "make_pipeline": ["make_pipline", "makepipeline"],
    "VotingClassifier": ["VoteClassifier"],
    "BaggingClassifier": ["BaggingClassifer"],
}

_VAR_TYPOS = {
    "model": ["modle", "mdl", "models"],
    "clf": ["clf1", "classifier"],
    "pipe": ["pipeline", "pip"],
    "estimator": ["estimater", "est"],
}

# Estimators without predict_proba (or without it by default).
_NO_PROBA: list[tuple[Call, bool]] = [  # (call, uses the available_if "This 'X' has no attribute" message)
    (Call("SVC", "sklearn.svm"), True),
    (Call("SVC", "sklearn.svm", (("kernel", Str("rbf")),)), True),
    (Call("LinearSVC", "sklearn.svm"), False),
    (Call("LinearSVC", "sklearn.svm", (("C", "1.0"),)), False),
    (Call("RidgeClassifier", "sklearn.linear_model"), False),
    (Call("RidgeClassifier", "sklearn.linear_model", (("alpha", "1.0"),)), False),
    (Call("Perceptron", "sklearn.linear_model"), False),
    (Call("SGDClassifier", "sklearn.linear_model"), True),
]


def _body(program: Program) -> str:
    return indent(render_lines(program))


def _no_attribute(owner: str, available_if: bool, attr: str = "predict_proba") -> str:
    if available_if:
        return f"AttributeError: This '{owner}' has no attribute '{attr}'"
    return f"AttributeError: '{owner}' object has no attribute '{attr}'"


def _set_kwarg(call: Call, key: str, value, rng: random.Random, replaces: str | None = None) -> Call:
    kwargs = [kv for kv in call.kwargs if kv[0] not in (key, replaces)]
    kwargs.insert(rng.randint(0, len(kwargs)), (key, value))
    return call.with_kwargs(kwargs)


def _replace_step(program: Program, old: Call, new: Call) -> Program:
    if old is program.estimator:
        return replace(program, estimator=new)
    return replace(program, steps=tuple(new if s is old else s for s in program.steps))


def wrong_param(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """An unknown keyword: ``TypeError`` when the class is constructed."""
    targets = [c for c in [program.estimator, *program.steps] if c.cls in _BOGUS]
    if not targets:
        return None
    call = rng.choice(targets)
    key, value = rng.choice(_BOGUS[call.cls])
    if value is None:  # a renamed keyword: reuse the value of the current one
        value = dict(call.kwargs).get("estimator")
        if value is None:
            return None
        new = _set_kwarg(call, key, value, rng, replaces="estimator")
    else:
        new = _set_kwarg(call, key, value, rng)
    error = f"TypeError: {call.cls}.__init__() got an unexpected keyword argument '{key}'"
    return Broken(_body(_replace_step(program, call, new)), "wrong_param", error)


def bad_value(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """A valid keyword with a value sklearn rejects when fitting."""
    est = program.estimator
    options = list(_BAD_VALUES.get(est.cls, []))
    if est.cls == "LogisticRegression" and ctx.n_classes >= 3:
        options.append(("solver", "liblinear", _LIBLINEAR_MULTICLASS))
    if not options:
        return None
    key, value, error = rng.choice(options)
    new = _set_kwarg(est, key, Str(value), rng)
    if est.cls == "LinearDiscriminantAnalysis":  # shrinkage needs solver="lsqr"; drop it
        new = new.with_kwargs([kv for kv in new.kwargs if kv[0] != "solver"])
    return Broken(_body(replace(program, estimator=new)), "bad_value", error)


def missing_fit(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """The model is returned unfitted, or fitted with a method that does not exist."""
    lines = render_lines(program)
    fit = f".fit({FIT_ARGS})"
    i = next(j for j, ln in enumerate(lines) if fit in ln)
    if rng.random() < 0.3:
        lines[i] = lines[i].replace(fit, f".train({FIT_ARGS})")
        return Broken(indent(lines), "missing_fit", _no_attribute(program.outer, False, "train"))
    if lines[i] == f"{program.var}{fit}":
        del lines[i]
    else:
        lines[i] = lines[i].replace(fit, "")
    if program.estimator.cls == "StackingClassifier":
        error = _no_attribute(program.outer, True)  # its predict_proba hides until fitted
    else:
        error = (
            f"NotFittedError: This {program.outer} instance is not fitted yet. Call 'fit' with "
            "appropriate arguments before using this estimator."
        )
    return Broken(indent(lines), "missing_fit", error)


def bad_import(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """A class imported from the wrong module or under a wrong name."""
    used = {c.cls: c.module for c in calls_in(program)}
    used.update({"make_pipeline": "sklearn.pipeline"} if program.steps and program.assemble != "Pipeline" else {})
    used.update({"Pipeline": "sklearn.pipeline"} if program.assemble == "Pipeline" else {})
    if program.imports == "module":  # ``ensemble.RandomForestClassifer`` fails at attribute access
        cands = [c for c in used if c in _TYPOS]
        if not cands:
            return None
        cls = rng.choice(cands)
        typo = rng.choice(_TYPOS[cls])
        body = _body(replace(program, code_name={cls: typo}))
        return Broken(body, "bad_import", f"AttributeError: module '{used[cls]}' has no attribute '{typo}'")
    cands = [c for c in used if c in _WRONG_MODULES or c in _TYPOS]
    if not cands:
        return None
    cls = rng.choice(cands)
    if cls in _WRONG_MODULES and (cls not in _TYPOS or rng.random() < 0.5):
        mod = rng.choice(_WRONG_MODULES[cls])
        if mod in EXISTING_MODULES:
            error = f"ImportError: cannot import name '{cls}' from '{mod}'"
        else:
            error = f"ModuleNotFoundError: No module named '{mod}'"
        return Broken(_body(replace(program, import_module={cls: mod})), "bad_import", error)
    typo = rng.choice(_TYPOS[cls])
    error = f"ImportError: cannot import name '{typo}' from '{used[cls]}'"
    return Broken(_body(replace(program, import_name={cls: typo})), "bad_import", error)


def no_proba(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """A classifier that cannot give probabilities (ROC AUC needs ``predict_proba``)."""
    est = program.estimator
    if est.cls == "VotingClassifier":  # hard voting, the default
        new = est.with_kwargs([kv for kv in est.kwargs if kv[0] != "voting"])
        available_if = True
    elif est.cls in META:
        return None
    elif est.cls == "SVC" and rng.random() < 0.6:
        new = est.with_kwargs([kv for kv in est.kwargs if kv[0] != "probability"])
        available_if = True
    else:
        new, available_if = rng.choice(_NO_PROBA)
    owner = program.outer if program.steps else new.cls
    return Broken(_body(replace(program, estimator=new)), "no_proba", _no_attribute(owner, available_if or bool(program.steps)))


def name_error(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """A misspelled variable, ``X_train`` for ``x_train``, or a forgotten import."""
    lines = render_lines(program)
    mode = rng.choice(["var", "X", "import"])
    # A typo must not hit another name of the body (``pipeline`` may be an imported module).
    defined = {ln.split(" = ")[0] for ln in lines if " = " in ln}
    defined |= {w.strip(",") for ln in import_lines(program) for w in ln.split()}
    if mode == "var" and lines[-1] == f"return {program.var}":
        typos = [t for t in _VAR_TYPOS[program.var] if t not in defined]
        typo = rng.choice(typos)
        i = rng.choice([len(lines) - 2, len(lines) - 1]) if lines[-2].startswith(program.var + ".fit") else len(lines) - 1
        lines[i] = lines[i].replace(program.var, typo, 1)
        return Broken(indent(lines), "name_error", f"NameError: name '{typo}' is not defined")
    if mode == "import":
        heads = import_lines(program)
        if program.imports == "module":
            short = heads[0].removeprefix("from sklearn import ").split(", ")
            drop = rng.choice(short)
            mods = {c.module for c in calls_in(program)} | {"sklearn.pipeline"}
            full = next(m for m in mods if m.endswith("." + drop))
            new = replace(program, skip_import=frozenset({full}))
            if not import_lines(new):
                return None
            return Broken(_body(new), "name_error", f"NameError: name '{drop}' is not defined")
        names = [c.cls for c in calls_in(program)]
        drop = rng.choice(names)
        new = replace(program, skip_import=frozenset({drop}))
        if not import_lines(new):
            return None
        return Broken(_body(new), "name_error", f"NameError: name '{drop}' is not defined")
    fit = f".fit({FIT_ARGS})"
    i = next(j for j, ln in enumerate(lines) if fit in ln)
    lines[i] = lines[i].replace(fit, ".fit(X_train, y_train)")
    return Broken(indent(lines), "name_error", "NameError: name 'X_train' is not defined")


def wrong_return(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """Returns predictions, a score or nothing instead of the fitted model."""
    lines = render_lines(program)
    last = lines[-1]
    mode = rng.choice(["none", "predict", "score", "proba"])
    if mode == "none" and last == f"return {program.var}":
        return Broken(indent(lines[:-1]), "wrong_return", _no_attribute("NoneType", False))
    suffix, owner = {
        "predict": (".predict(x_train)", "numpy.ndarray"),
        "proba": (".predict_proba(x_train)", "numpy.ndarray"),
        "score": (".score(x_train, y_train)", "float"),
        "none": (".predict(x_train)", "numpy.ndarray"),
    }[mode]
    lines[-1] = last + suffix
    return Broken(indent(lines), "wrong_return", _no_attribute(owner, False))


def _syntax_variants(rng: random.Random, lines: list[str]) -> list[list[str]]:
    """Candidate slips on indented lines: an unclosed parenthesis, a missing comma, ``:`` for
    ``=``, a line indented too far or not far enough."""
    out: list[list[str]] = []
    code = [i for i, ln in enumerate(lines) if ln.strip() and not ln.lstrip().startswith(("from ", "import ", "#"))]
    for i in code:
        ln = lines[i]
        if ln.endswith(")") and "(" in ln:
            out.append(lines[:i] + [ln[:-1]] + lines[i + 1:])
        if ", " in ln and "=" in ln.split(", ", 1)[1]:
            head, tail = ln.split(", ", 1)
            out.append(lines[:i] + [f"{head} {tail}"] + lines[i + 1:])
        if "=" in ln and "(" in ln and ln.index("(") < ln.rindex("="):
            j = ln.rindex("=")
            if ln[j - 1] not in "=!<>" and ln[j + 1 : j + 2] != "=":
                out.append(lines[:i] + [ln[:j] + ": " + ln[j + 1:]] + lines[i + 1:])
    for i in code[1:]:
        out.append(lines[:i] + ["  " + lines[i]] + lines[i + 1:])
        out.append(lines[:i] + [lines[i][2:]] + lines[i + 1:])
    rng.shuffle(out)
    return out


def syntax(rng: random.Random, program: Program, ctx: Ctx) -> Broken | None:
    """A slip that does not compile; the message comes from compiling it."""
    lines = indent(render_lines(program)).splitlines()
    for variant in _syntax_variants(rng, lines):
        body = "".join(ln + "\n" for ln in variant)
        try:
            compile("def build_model(x_train, y_train):\n" + body, "<string>", "exec")
        except SyntaxError as err:
            return Broken(body, "syntax", f"{type(err).__name__}: {err.msg}")
    return None


BREAKERS: dict[str, Callable[[random.Random, Program, Ctx], Broken | None]] = {
    "wrong_param": wrong_param,
    "bad_value": bad_value,
    "missing_fit": missing_fit,
    "bad_import": bad_import,
    "no_proba": no_proba,
    "name_error": name_error,
    "wrong_return": wrong_return,
    "syntax": syntax,
}


def break_program(rng: random.Random, program: Program, ctx: Ctx) -> Broken:
    """Break ``program`` in a kind drawn uniformly among those that apply to it."""
    kinds = list(FAILURE_KINDS)
    rng.shuffle(kinds)
    for kind in kinds:
        broken = BREAKERS[kind](rng, program, ctx)
        if broken is not None:
            return broken
    raise AssertionError("wrong_return applies to every program")
