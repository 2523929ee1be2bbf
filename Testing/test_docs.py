"""The documentation (README.md, MODELS.md, docs/): one headline number for the shipped model, read from its results
file and quoted the same everywhere, and relative links that resolve (issue 30).

The headline of ``hn-oar-7`` is its all-OAR DSC on the 10 OpenKBP validation patients as shipped, i.e. with the
test-time mirroring its bundle records on: arm "as shipped", ``All OARs`` of
``Testing/results/recipe_cpu/postprocessing_hn_oar_7.json``. Editing the number in one document only, or the results
without the documents, fails here.
"""

from __future__ import annotations

import json
import re
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
RESULTS = REPO / "Testing" / "results" / "recipe_cpu" / "postprocessing_hn_oar_7.json"
BUNDLE = REPO / "separeg" / "models" / "hn-oar-7.separeg"
README = REPO / "README.md"
DOCS = [README, REPO / "MODELS.md", *sorted((REPO / "docs").glob("*.md"))]
# Documents that must quote the headline; every document that quotes an all-OAR DSC must quote this one.
QUOTING = [README, REPO / "MODELS.md", REPO / "docs" / "planner.md"]
QUOTE = re.compile(r"(\d+(?:\.\d+)?) % all-OAR DSC")
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _bundle_json() -> dict:
    with zipfile.ZipFile(BUNDLE) as zf:
        return json.loads(zf.read("bundle.json").decode("utf-8"))


def _results() -> dict:
    return json.loads(RESULTS.read_text(encoding="utf-8"))


def _arm_mean(results: dict, arm: str) -> float:
    """The ``All OARs`` mean DSC % of one arm of the ablation (the same in every comparison that holds it)."""
    means = {round(c["differences"]["All OARs"][side + "_mean"], 6)
             for c in results["comparisons"] for side in ("a", "b") if c[side] == arm}
    assert len(means) == 1, (arm, means)
    return means.pop()


def headline() -> str:
    """``"62.2 %"``-style: the shipped model's all-OAR DSC as the documents write it."""
    return f"{_arm_mean(_results(), 'as shipped'):.1f} %"


def _text(path: Path) -> str:
    return path.read_text(encoding="utf-8")


def test_headline_source_is_the_shipped_model_as_shipped() -> None:
    """The results file is hn-oar-7 on its bundle's 10 validation patients, and "as shipped" means mirrored."""
    results, bundle = _results(), _bundle_json()
    validation = bundle["release"]["validation"]
    assert results["model"] == "hn-oar-7" and results["test"] == validation["patients"]
    mirroring = bundle["test_time_mirroring"]
    assert mirroring["chosen"] is True  # contour mirrors by default: the shipped figure is the mirrored one
    # The arm without mirroring is the bundle's own validation table (measured before mirroring was added).
    unmirrored = validation["per_organ"]["All organs"]["dsc_mean_percent"]
    assert abs(_arm_mean(results, "no mirroring") - unmirrored) < 0.1
    assert f"-> {headline()}" in mirroring["how"]  # the bundle's note records the same value


@pytest.mark.parametrize("path", QUOTING, ids=lambda p: str(p.relative_to(REPO)))
def test_documents_quote_the_headline(path: Path) -> None:
    quoted = [f"{q} %" for q in QUOTE.findall(_text(path))]
    assert quoted, f"{path.name} does not quote hn-oar-7's headline ({headline()} all-OAR DSC)"


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_all_oar_quote_is_the_headline(path: Path) -> None:
    wrong = [f"{q} %" for q in QUOTE.findall(_text(path)) if f"{q} %" != headline()]
    assert not wrong, f"{path.name} quotes {wrong} as the all-OAR DSC; the results say {headline()} ({RESULTS.name})"


def test_other_figures_stay_in_the_model_card() -> None:
    """Without mirroring and on the held-out patients are details of MODELS.md, not headlines elsewhere."""
    bundle = _bundle_json()
    unmirrored = bundle["release"]["validation"]["per_organ"]["All organs"]["dsc_mean_percent"]
    held_out = 100 * bundle["test_time_mirroring"]["dsc"]["mirrored"]
    for path in [README, *sorted((REPO / "docs").glob("*.md"))]:
        for value in (unmirrored, held_out):
            assert f"{value:.1f} %" not in _text(path), (path.name, f"{value:.1f} %")


def test_readme_is_a_front_page() -> None:
    text = _text(README)
    assert text.startswith("# SepaReg for 3D Slicer\n")
    assert "Resources/Screenshots/sis_overlay_lung1.png" in text
    assert "make demo" in text and "make test" in text
    assert len(text.splitlines()) <= 200, "the README is the front page; details go to docs/"


def _slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in FENCE.sub("", _text(path)).splitlines():
        match = re.match(r"#{1,6} (.+)", line)
        if match:
            slug = _slug(match.group(1))
            anchors.add(slug if slug not in seen else f"{slug}-{seen[slug]}")
            seen[slug] = seen.get(slug, 0) + 1
    return anchors


@pytest.mark.parametrize("path", DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_relative_links_resolve(path: Path) -> None:
    broken = []
    for target in LINK.findall(FENCE.sub("", _text(path))):
        if re.match(r"[a-z][a-z0-9+.-]*:", target):  # http:, https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        if not resolved.exists():
            broken.append(target)
        elif anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved):
            broken.append(f"{target} (no such heading)")
    assert not broken, f"{path.name}: broken links {broken}"
