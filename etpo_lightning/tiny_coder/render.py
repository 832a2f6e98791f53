"""Rendering a :class:`~etpo_lightning.tiny_coder.programs.Program` as the source of a
``build_model`` body: imports grouped by module, the statements, the indentation.

``programs.py`` describes and samples programs; this file only turns them into text (and
the overrides that ``failures.py`` sets on a program, e.g. a class imported from the wrong
module, show up here).
"""

from __future__ import annotations

from etpo_lightning.tiny_coder.programs import FIT_ARGS, Call, Named, Program, Str, Value, calls_in

INDENT = "    "

_STEP_NAMES = {
    "StandardScaler": "scaler", "MinMaxScaler": "scaler", "RobustScaler": "scaler",
    "SimpleImputer": "imputer", "PolynomialFeatures": "poly", "SelectKBest": "select", "PCA": "pca",
}


def _ref(program: Program, cls: str, module: str) -> str:
    name = program.code_name.get(cls, program.import_name.get(cls, cls))
    if program.imports == "module":
        return f"{module.rsplit('.', 1)[1]}.{name}"
    return name


def _expr(program: Program, v: Value) -> str:
    q = program.quote
    if isinstance(v, Str):
        return f"{q}{v.text}{q}"
    if isinstance(v, Named):
        return "[" + ", ".join(f"({q}{n}{q}, {_expr(program, c)})" for n, c in v.items) + "]"
    if isinstance(v, Call):
        parts = [_expr(program, a) for a in v.args] + [f"{k}={_expr(program, a)}" for k, a in v.kwargs]
        return f"{_ref(program, v.cls, v.module)}({', '.join(parts)})"
    return v


def _helpers(program: Program) -> list[tuple[str, str]]:
    """Non-estimator names the body uses: the pipeline helpers."""
    if program.assemble == "Pipeline":
        return [("Pipeline", "sklearn.pipeline")]
    if program.steps:
        return [("make_pipeline", "sklearn.pipeline")]
    return []


def import_lines(program: Program) -> list[str]:
    """``from`` imports grouped by module, in order of first use."""
    names: list[tuple[str, str]] = [(c.cls, c.module) for c in calls_in(program)] + _helpers(program)
    if program.imports == "module":
        mods: list[str] = []
        for cls, mod in names:
            short = mod.rsplit(".", 1)[1]
            if short not in mods and mod not in program.skip_import:
                mods.append(short)
        return [f"from sklearn import {', '.join(mods)}"] if mods else []
    grouped: dict[str, list[str]] = {}
    for cls, mod in names:
        if cls in program.skip_import:
            continue
        mod = program.import_module.get(cls, mod)
        name = program.import_name.get(cls, cls)
        if name not in grouped.setdefault(mod, []):
            grouped[mod].append(name)
    return [f"from {mod} import {', '.join(cls)}" for mod, cls in grouped.items()]


def _wrapped_assignment(program: Program, var: str, items: list[str]) -> list[str]:
    """``var = f(`` + one item a line + ``)``: how long calls are usually formatted."""
    if program.assemble == "Pipeline":
        head, tail = f"{var} = {_ref(program, 'Pipeline', 'sklearn.pipeline')}([", "])"
    elif items:
        head, tail = f"{var} = {_ref(program, 'make_pipeline', 'sklearn.pipeline')}(", ")"
    else:  # a single long estimator call: one keyword argument a line
        est = program.estimator
        items = [_expr(program, a) for a in est.args] + [f"{k}={_expr(program, a)}" for k, a in est.kwargs]
        head, tail = f"{var} = {_ref(program, est.cls, est.module)}(", ")"
    return [head] + [f"{INDENT}{it}," for it in items] + [tail]


def _pipeline_expr(program: Program, parts: list[str]) -> tuple[str, list[str]]:
    """(one-line expression, its items) for the assembled model."""
    q = program.quote
    if program.assemble == "Pipeline":
        names = [_STEP_NAMES.get(s.cls, "step") for s in program.steps] + ["clf"]
        items = [f"({q}{n}{q}, {p})" for n, p in zip(names, parts)]
        return f"{_ref(program, 'Pipeline', 'sklearn.pipeline')}([{', '.join(items)}])", items
    return f"{_ref(program, 'make_pipeline', 'sklearn.pipeline')}({', '.join(parts)})", parts


def code_lines(program: Program) -> list[str]:
    """The statements after the imports, without the leading indent."""
    v = program.var
    lines: list[str] = []
    parts = [_expr(program, s) for s in program.steps] + [_expr(program, program.estimator)]
    if program.assemble == "named":
        names = [_STEP_NAMES.get(s.cls, "step") for s in program.steps] + ["clf" if v != "clf" else "base"]
        for n, p in zip(names, parts):
            lines.append(f"{n} = {p}")
        parts = names
    if program.steps:
        expr, items = _pipeline_expr(program, parts)
    else:
        expr, items = parts[0], []
    fit = f".fit({FIT_ARGS})"
    if program.finish == "chain_return" and len(expr) < 70:
        return lines + [f"return {expr}{fit}"]
    if program.finish == "assign_chain" and len(expr) < 70:
        return lines + [f"{v} = {expr}{fit}", f"return {v}"]
    if len(expr) + len(v) > 80:
        lines += _wrapped_assignment(program, v, items)
    else:
        lines.append(f"{v} = {expr}")
    return lines + [f"{v}.fit({FIT_ARGS})", f"return {v}"]


def render_lines(program: Program) -> list[str]:
    """Imports, an optional blank line and comment, then the code; no indentation yet."""
    head = import_lines(program)
    body = code_lines(program)
    extra = [f"# {program.comment}"] if program.comment else []
    sep = [""] if len(head) + len(body) > 4 else []
    return head + sep + extra + body


def indent(lines: list[str]) -> str:
    """Indent statement lines into a function body (blank lines stay empty)."""
    return "".join(f"{INDENT}{ln}\n" if ln else "\n" for ln in lines)


def render(program: Program) -> str:
    """The body as the agent writes it: 4-space indented lines, trailing newline."""
    return indent(render_lines(program))
