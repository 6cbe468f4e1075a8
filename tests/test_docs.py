"""The documentation site builds in strict mode, and the README stays a short front door."""

from __future__ import annotations

import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    """``mkdocs build --strict`` as ``make docs`` runs it, into ``site``."""
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file", str(config),
         "--site-dir", str(site)],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=300, check=False)


def test_docs_build_strict_without_warnings(tmp_path):
    site = tmp_path / "site"
    result = _build(ROOT / "mkdocs.yml", site)
    output = result.stdout + result.stderr
    assert result.returncode == 0, output
    assert "WARNING" not in output, output
    # every page of the nav was written, and Figure 2 is the notebook's own file
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    pages = re.findall(r"[\w/-]+\.md", str(config["nav"]))
    assert len(pages) >= 20
    for page in pages:  # directory URLs: losses.md -> losses/index.html, api/index.md -> api/
        folder = page.removesuffix(".md").removesuffix("index")
        assert (site / folder / "index.html").is_file(), page
    figure = site / "assets" / "figures" / "figure2.png"
    assert figure.read_bytes() == (ROOT / "notebooks" / "figures" / "figure2.png").read_bytes()
    # the API pages are generated from the docstrings: DGPOLoss's own summary line is there
    from dgpo.losses import DGPOLoss

    summary = DGPOLoss.__doc__.strip().splitlines()[0]
    api = (site / "api" / "losses" / "index.html").read_text()
    assert 'id="dgpo.losses.dgpo.DGPOLoss"' in api
    assert summary.split("(")[0].strip() in api


def test_docs_build_fails_on_broken_link(tmp_path):
    # the real config's strictness and link validation, on the guide pages only (no API pages:
    # their build is the slow part and the test above covers it)
    docs = tmp_path / "docs"
    shutil.copytree(ROOT / "docs", docs, ignore=shutil.ignore_patterns("api"))
    with (docs / "index.md").open("a") as page:
        page.write("\nSee [the missing page](no-such-page.md).\n")
    config = yaml.safe_load((ROOT / "mkdocs.yml").read_text())
    config["docs_dir"] = str(docs)
    config["nav"] = [entry for entry in config["nav"] if "API reference" not in entry]
    config["plugins"] = ["search"]
    for page in docs.glob("*.md"):  # links into the API pages become plain text
        page.write_text(re.sub(r"\[([^\]]+)\]\[[\w.]+\]|\[([^\]]+)\]\(api/[^)]*\)",
                               lambda m: m.group(1) or m.group(2), page.read_text()))
    (tmp_path / "mkdocs.yml").write_text(yaml.safe_dump(config))
    result = _build(tmp_path / "mkdocs.yml", tmp_path / "site")
    output = result.stdout + result.stderr
    assert result.returncode != 0, output
    warnings = [line for line in output.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and "no-such-page.md" in warnings[0], output


def test_readme_short_and_links_resolve():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    assert text.startswith("# dgpo\n\n```bash\nmake quickstart")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    local = [link for link in links if "://" not in link]
    assert local, "the README links to the docs pages"
    for link in local:
        assert (ROOT / link).exists(), link


def test_docstring_conventions_rewrite_example_titles_and_roles():
    spec = importlib.util.spec_from_file_location("griffe_extensions",
                                                  ROOT / "docs" / "griffe_extensions.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    text = ("Uses :class:`~dgpo.losses.PolicyLoss` and :func:`dgpo.losses.build_loss`.\n\n"
            "    Example:\n        >>> 1\n    Examples: not a title\n")
    assert module.normalise(text) == (
        "Uses `PolicyLoss` and `dgpo.losses.build_loss`.\n\n"
        "    Examples:\n        >>> 1\n    Examples: not a title\n")
