"""The front door: the README's two commands, the names it promises, and every link of README.md
and docs/*.md (files and #anchors) resolve; docs/CONFIG.md lists every config key."""

import dataclasses
import re
from pathlib import Path

import pytest

from hpa_scc.config import Config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation but '-' and '_' dropped, spaces -> '-'."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # a '#' in a code block is no heading
    return {slug(line.lstrip("#")) for line in text.splitlines() if re.match(r"#{1,6} ", line)}


def test_the_two_commands_are_in_the_readme_and_exist():
    text = README.read_text()
    for command in ("bash scripts/demo.sh", "bash scripts/test.sh"):
        assert re.search(rf"^{re.escape(command)}\b", text, flags=re.M), command  # a line of its own, to copy
        assert (ROOT / command.split()[1]).is_file()


def test_the_readme_names_the_top_level_files_and_credits_the_images():
    text = README.read_text()
    for name in ("README.md", "run-model.sbatch", "train_densenet.py", "dataset.py", "detectron_code/", "notebooks/",
                 "requirements.txt", "Singularity.def"):
        assert name in text, name
        assert (ROOT / name).exists(), name
    assert "## Status" in text
    assert "Human Protein\nAtlas (www.proteinatlas.org), CC BY-SA" in text


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_every_link_resolves(page):
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # https://, mailto: ...
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        assert dest.exists(), f"{page.name}: {target} does not exist"
        if anchor:
            assert anchor in anchors(dest), f"{page.name}: {target}: no heading #{anchor} in {dest.name}"


def test_the_config_reference_lists_every_key():
    text = (ROOT / "docs" / "CONFIG.md").read_text()
    cfg = Config()
    keys = [f"{section.name}.{f.name}" for section in dataclasses.fields(cfg)
            for f in dataclasses.fields(getattr(cfg, section.name))]
    missing = [key for key in keys if f"| `{key}` |" not in text]
    assert not missing, f"add a row for each of {missing} to docs/CONFIG.md (key, type, default, allowed, what it does)"
