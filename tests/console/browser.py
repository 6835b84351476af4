"""Headless Chromium (Debian's package) for page tests: the DOM after load, and a screenshot."""

from __future__ import annotations

import os
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import pytest

ARTEFACTS = Path(__file__).resolve().parents[2] / "reports"  # git-ignored: screenshots of test runs


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("chromium is not installed: scripts/install-tools.sh installs it")
        pytest.skip("chromium not installed (scripts/install-console.sh)")
    return found


def _run(args: list[str], user_dir: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
         "--disable-extensions", "--disable-background-networking", "--disable-sync",
         f"--user-data-dir={user_dir}", "--hide-scrollbars", *args],
        capture_output=True, text=True, timeout=120,
    )


def dump_dom(page: Path, tmp_path: Path) -> str:
    done = _run(["--virtual-time-budget=5000", "--dump-dom", page.resolve().as_uri()], tmp_path / "chromium")
    assert done.returncode == 0 and "<html" in done.stdout, done.stderr[-2000:]
    return done.stdout


def screenshot(page: Path, out: Path, tmp_path: Path, size: str = "1280,2200") -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    done = _run([f"--window-size={size}", f"--screenshot={out}", page.resolve().as_uri()], tmp_path / "chromium")
    assert done.returncode == 0 and out.is_file() and out.stat().st_size > 10_000, done.stderr[-2000:]
    return out


class Dom(HTMLParser):
    """Just enough of the DOM: elements by id, every <img>, and table cells with data-key/data-value."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.ids: dict[str, dict[str, str | None]] = {}
        self.images: list[dict[str, str | None]] = []
        self.tables: dict[str, list[dict[str, str | None]]] = {}
        self.text_by_id: dict[str, str] = {}
        self._table: str | None = None
        self._row: dict[str, str | None] | None = None
        self._open: list[tuple[str, str]] = []  # (tag, id) of the open elements that have an id
        self.feed(text)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if a.get("id"):
            self.ids[str(a["id"])] = a
            if tag not in ("img", "br", "input", "meta"):
                self._open.append((tag, str(a["id"])))
            self.text_by_id.setdefault(str(a["id"]), "")
        if tag == "img":
            self.images.append(a)
        if tag == "table" and a.get("id"):
            self._table = str(a["id"])
            self.tables[self._table] = []
        if tag == "tr" and self._table:
            self._row = {}
        if tag == "td" and self._row is not None and a.get("data-key"):
            self._row[str(a["data-key"])] = a.get("data-value")

    def handle_endtag(self, tag: str) -> None:
        if self._open and self._open[-1][0] == tag:
            self._open.pop()
        if tag == "tr" and self._table and self._row:
            self.tables[self._table].append(self._row)
            self._row = None
        if tag == "table":
            self._table = None

    def handle_data(self, data: str) -> None:
        for _, element in self._open:
            self.text_by_id[element] += data
