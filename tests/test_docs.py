"""The documents say what the product does: the configuration page lists exactly the flags of
`serve --help`, the README's groups name every flag, every finish_reason a route can answer is
documented with that route, and relative links lead to files."""

from __future__ import annotations

import argparse
import re
import typing
from pathlib import Path

import pytest

from server.api.openai.schemas import FinishReason as OpenAIFinishReason
from server.cli import build_parser
from server.engine.interface import FinishReason

REPO_ROOT = Path(__file__).resolve().parents[1]
DOCS = [REPO_ROOT / "README.md", *sorted((REPO_ROOT / "docs").glob("*.md")),
        REPO_ROOT / "deploy" / "README.md", REPO_ROOT / "benchmarks" / "README.md",
        REPO_ROOT / "benchmarks" / "RESULTS.md",
        REPO_ROOT / "benchmarks" / "lm_eval" / "README.md"]


def _serve_flags() -> set[str]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {flag for action in sub.choices["serve"]._actions for flag in action.option_strings
            if flag.startswith("--") and flag != "--help"}


def test_the_configuration_page_lists_exactly_the_serve_flags():
    text = (REPO_ROOT / "docs" / "configuration.md").read_text()
    listed = {flag for row in text.splitlines() if row.startswith("| `--")
              for flag in re.findall(r"`(--[a-z0-9-]+)`", row.split(" | ")[0])}
    assert listed == _serve_flags()


def test_the_readme_groups_name_every_flag():
    text = (REPO_ROOT / "README.md").read_text()
    named = set(re.findall(r"`(--[a-z0-9-]+)\*?`", text))
    wildcards = [w for w in re.findall(r"`(--[a-z0-9-]+)\*`", text)]
    missing = {f for f in _serve_flags() if not f.startswith("--no-") and f not in named
               and not any(f.startswith(w) for w in wildcards)}
    assert not missing


def test_every_generate_finish_reason_is_documented():
    text = (REPO_ROOT / "docs" / "api.md").read_text()
    table = set(re.findall(r'^\| `"([a-z]+)"` \|', text, flags=re.MULTILINE))
    assert table == {r.value for r in FinishReason}


def test_the_openai_page_names_only_openais_finish_reasons():
    text = (REPO_ROOT / "docs" / "openai.md").read_text()
    [sentence] = [p for p in text.split("\n\n") if p.startswith("`finish_reason`")]
    named = set(re.findall(r'`"([a-z]+)"`', sentence))
    openai = set(typing.get_args(OpenAIFinishReason))
    assert openai <= named and named - openai == {"eos"}  # eos only as what maps to "stop"
    assert '`"stop"` (an end-of-sequence token' in sentence


def _anchors(doc: Path) -> set[str]:
    """GitHub's anchors for a Markdown file's headings (outside code blocks)."""
    anchors, fenced = set(), False
    for line in doc.read_text().splitlines():
        if line.startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6} (.+)", line)):
            slug = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
            anchors.add(slug)
    return anchors


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_relative_links_lead_to_files_and_their_sections(doc):
    text = doc.read_text()
    for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", text):
        if re.match(r"[a-z]+://", target) or target.startswith("mailto:"):
            continue
        path = doc.parent / target if target else doc
        assert path.exists(), f"{doc.name}: {target}"
        if anchor and path.suffix == ".md":
            assert anchor in _anchors(path), f"{doc.name}: {target}#{anchor}"


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: str(p.relative_to(REPO_ROOT)))
def test_sections_named_in_the_top_level_readme_are_there(doc):
    """Prose like 'see "Scaling out" in the top-level README' names a heading the README has."""
    readme = {h.replace("-", " ") for h in _anchors(REPO_ROOT / "README.md")}
    for name in re.findall(r'"([^"]+)"\s+in\s+the\s+top-level\s+README', doc.read_text()):
        assert name.lower() in readme, f"{doc.name}: \"{name}\" is not a README section"
