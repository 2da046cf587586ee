"""The documentation site: every page in mkdocs.yml's nav exists, and ``mkdocs build --strict`` passes."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "mkdocs.yml"


def _nav_pages(entry: Any) -> list[str]:
    """Every page path in a nav tree (strings, lists and one-key mappings)."""
    if isinstance(entry, str):
        return [entry]
    if isinstance(entry, list):
        return [page for item in entry for page in _nav_pages(item)]
    if isinstance(entry, dict):
        return [page for value in entry.values() for page in _nav_pages(value)]
    raise TypeError(f"unexpected nav entry {entry!r}")


def _load_config() -> dict[str, Any]:
    yaml = pytest.importorskip("yaml", reason="PyYAML (installed with mkdocs) reads mkdocs.yml")
    with CONFIG.open(encoding="utf-8") as file:
        config: dict[str, Any] = yaml.safe_load(file)
    return config


def test_every_page_listed_in_the_mkdocs_nav_exists() -> None:
    config = _load_config()
    docs_dir = ROOT / config.get("docs_dir", "docs")
    pages = _nav_pages(config["nav"])
    assert len(pages) > 10
    missing = [page for page in pages if not (docs_dir / page).is_file()]
    assert missing == []


def test_every_markdown_file_in_docs_is_listed_in_the_nav() -> None:
    config = _load_config()
    docs_dir = ROOT / config.get("docs_dir", "docs")
    listed = set(_nav_pages(config["nav"]))
    on_disk = {path.relative_to(docs_dir).as_posix() for path in docs_dir.rglob("*.md")}
    assert sorted(on_disk - listed) == []


def test_the_docs_site_builds_with_mkdocs_strict_and_no_warnings(tmp_path: Path) -> None:
    pytest.importorskip(
        "mkdocs", reason="the docs extra is not installed (pip install -e '.[docs]')"
    )
    pytest.importorskip(
        "mkdocstrings", reason="the docs extra is not installed (pip install -e '.[docs]')"
    )
    pytest.importorskip(
        "material", reason="the docs extra is not installed (pip install -e '.[docs]')"
    )
    site = tmp_path / "site"
    completed = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(site)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    assert "WARNING" not in completed.stderr
    assert (site / "index.html").is_file()
    assert (site / "reference" / "python-api" / "index.html").is_file()
