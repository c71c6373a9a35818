"""The documentation site builds strictly, its configuration reference lists every field of
the training job's config, each with a description, and a broken link fails the build."""

from __future__ import annotations

import inspect
import os
import shutil
import subprocess
import sys
import types
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

ROOT = Path(__file__).resolve().parents[1]

try:
    import mkdocs  # noqa: F401
    import mkdocstrings  # noqa: F401
except ImportError:
    pytest.skip(
        "mkdocs is not installed: the `docs` extra (`pip install -c constraints.txt -e .[docs]`, "
        "which `make test` installs)",
        allow_module_level=True,
    )


def build(config: Path, site: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "NO_MKDOCS_2_WARNING": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "-f", str(config), "-d", str(site)],
        cwd=config.parent,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


@pytest.fixture(scope="module")
def site(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("site")
    done = build(ROOT / "mkdocs.yml", out)
    assert done.returncode == 0, done.stdout + done.stderr
    return out


def _section(annotation: typing.Any) -> type[BaseModel] | None:
    """The one pydantic model a field holds (``X`` or ``X | None``)."""
    args = typing.get_args(annotation)
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        models = [a for a in args if a is not type(None)]
        annotation = models[0] if len(models) == 1 else None
    if inspect.isclass(annotation) and issubclass(annotation, BaseModel):
        return annotation
    return None


def dotted_keys(model: type[BaseModel], prefix: str = "") -> list[str]:
    """Every dotted key of a config, nested sections included."""
    keys = []
    for name, info in model.model_fields.items():
        key = prefix + name
        keys.append(key)
        inner = _section(info.annotation)
        if inner is not None:
            keys += dotted_keys(inner, key + ".")
    return keys


def test_strict_build_writes_every_page(site):
    assert (site / "index.html").is_file()
    for page in ("quickstart", "how-to/endpoint", "concepts/data-flow", "benchmarks"):
        assert (site / page / "index.html").is_file(), page
    # the README's architecture diagram, included into the data-flow page
    assert "WindowIndex" in (site / "concepts" / "data-flow" / "index.html").read_text()
    api = (site / "reference" / "api" / "models" / "index.html").read_text()
    assert "cloudburst.models.registry.register" in api
    assert ":func:" not in api


def test_configuration_reference_lists_every_training_field(site):
    from cloudburst.config import TrainJobConfig
    from cloudburst.models import registry

    page = (site / "reference" / "configuration" / "index.html").read_text()
    keys = [k for k in dotted_keys(TrainJobConfig) if not k.startswith("model.")]
    # the families this package ships (a test elsewhere may have registered one of its own)
    for family in registry.families():
        if not family.config.__module__.startswith("cloudburst."):
            continue
        keys += dotted_keys(family.config, "model.")
    assert "train.dry_threshold" in keys and "model.loss" in keys and "data.windows.size" in keys
    missing = [k for k in keys if f"<code>{k}</code>" not in page]
    assert not missing, f"fields missing from the configuration reference: {missing}"


def test_every_row_of_the_configuration_reference_has_a_description(site):
    """Every field of every config the reference shows (jobs, sweep, ensemble request,
    endpoint settings, the shipped model families) says what it is for."""
    import re

    page = (site / "reference" / "configuration" / "index.html").read_text()
    rows = [
        re.findall(r"<td[^>]*>(.*?)</td>", row, re.S)
        for row in re.findall(r"<tr>(.*?)</tr>", page, re.S)
    ]
    fields = [cells for cells in rows if len(cells) == 5]
    assert len(fields) > 250  # the tables are there, not an empty page
    bare = [re.sub(r"<[^>]+>", "", cells[0]) for cells in fields if not cells[4].strip()]
    assert not bare, f"fields without a description in the configuration reference: {bare}"


def test_a_broken_link_fails_the_strict_build(tmp_path):
    shutil.copytree(ROOT / "docs", tmp_path / "docs")
    for name in ("mkdocs.yml", "README.md"):
        shutil.copy(ROOT / name, tmp_path / name)
    index = tmp_path / "docs" / "index.md"
    index.write_text(index.read_text() + "\nSee [the missing page](no-such-page.md).\n")
    done = build(tmp_path / "mkdocs.yml", tmp_path / "site")
    assert done.returncode != 0
    warnings = [ln for ln in (done.stdout + done.stderr).splitlines() if "WARNING" in ln]
    assert warnings, done.stdout + done.stderr
    assert all("no-such-page.md" in ln for ln in warnings), warnings
