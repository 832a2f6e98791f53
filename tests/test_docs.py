"""The docs and the bench results cite each other: no orphaned result file, no dead link."""

import re
import unicodedata
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITING = [*DOCS, *sorted((ROOT / "bench").glob("*.py")), *sorted((ROOT / "bench").glob("*.sh"))]


def _cited(path: Path, texts: list[str]) -> bool:
    """Named in full, or as ``stem.{json,md,png}`` with its suffix in the braces."""
    brace = re.escape(path.stem) + r"\.\{[^}]*\b" + re.escape(path.suffix.lstrip(".")) + r"\b[^}]*\}"
    pattern = re.compile(re.escape(path.name) + "|" + brace)
    return any(pattern.search(t) for t in texts)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in markdown.splitlines():
        if m := re.match(r"#+ (.*)", line):
            kept = "".join(c for c in m.group(1).strip().lower()
                           if c.isalnum() or c in " -_" or unicodedata.category(c).startswith("L"))
            out.add(kept.replace(" ", "-"))
    return out


def test_every_bench_result_is_cited_by_a_doc_or_a_bench_script():
    texts = [p.read_text() for p in CITING]
    orphans = [p.name for p in sorted(RESULTS.iterdir()) if not _cited(p, texts)]
    assert orphans == [], f"bench/results files no doc or bench script cites: {orphans}"


def test_every_relative_link_in_the_docs_resolves():
    dead = []
    for doc in DOCS:
        for m in re.finditer(r"\]\(([^)#\s]*)(#[^)\s]*)?\)", doc.read_text()):
            target, anchor = m.group(1), m.group(2)
            if target.startswith(("http://", "https://")):
                continue
            dest = (doc.parent / target).resolve() if target else doc
            if not dest.exists():
                dead.append(f"{doc.name}: {target}")
            elif anchor and dest.suffix == ".md" and anchor[1:] not in _anchors(dest.read_text()):
                dead.append(f"{doc.name}: {target}{anchor}")
    assert dead == [], f"dead links: {dead}"


def test_every_bench_results_path_named_in_the_docs_exists():
    missing = []
    for doc in DOCS:
        # `git show REV:bench/results/...` names a file of an earlier commit, on purpose.
        for m in re.finditer(r"(?<!:)bench/results/([\w.\-]+?)(?:\.\{([a-z,]+)\})?(?=[\s`'\"),:;]|$)", doc.read_text()):
            names = [f"{m.group(1)}.{e}" for e in m.group(2).split(",")] if m.group(2) else [m.group(1)]
            missing += [f"{doc.name}: {n}" for n in names if "." in n and not (RESULTS / n).exists()]
    assert missing == [], f"docs name result files that do not exist: {missing}"


def test_the_check_finds_an_orphan_and_a_dead_link(tmp_path):
    orphan = tmp_path / "learning_compare_old.json"
    orphan.write_text("{}")
    assert not _cited(orphan, ["see bench/results/learning_compare.{json,md,png}"])
    assert _cited(orphan, ["see bench/results/learning_compare_old.{json,png}"])
    assert "learning-etpoλ-vs-ppo-vs-grpo-on-the-quickstart-5-seeds-each" in _anchors(
        "## Learning: ETPO(λ) vs PPO vs GRPO on the quickstart, 5 seeds each")
    assert "memory" not in _anchors("## Throughput")
