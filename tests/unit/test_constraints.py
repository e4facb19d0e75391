"""constraints.txt, the exact versions every install uses (Makefile, bench/setup.sh,
infra/Dockerfile): it pins each dependency pyproject.toml names, within its range, and
`make install` installed those versions."""

from __future__ import annotations

import tomllib
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, pinned = line.partition("==")
        assert sep, f"not an exact pin: {line!r}"
        key = canonicalize_name(name)
        assert key not in pins, f"{name} pinned twice"
        pins[key] = Version(pinned)
    return pins


def _requirements() -> list[Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in ("dev", "embedded"):  # what make install installs
        listed += project["optional-dependencies"][extra]
    return [Requirement(text) for text in listed]


PINS = _pins()
REQUIREMENTS = _requirements()


def test_every_line_is_an_exact_pin_of_a_distinct_package() -> None:
    assert len(PINS) > len(REQUIREMENTS)  # the dependencies of dependencies are pinned too


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_each_dependency_is_pinned_within_its_range(requirement: Requirement) -> None:
    pinned = PINS.get(canonicalize_name(requirement.name))
    assert pinned is not None, f"{requirement.name} is not in constraints.txt: run make lock"
    assert requirement.specifier.contains(pinned, prereleases=True), (
        f"constraints.txt pins {requirement.name}=={pinned}, outside pyproject.toml's"
        f" {requirement.specifier}: run make lock"
    )


@pytest.mark.parametrize("requirement", REQUIREMENTS, ids=str)
def test_the_environment_has_the_pinned_version(requirement: Requirement) -> None:
    """make install passed constraints.txt to pip (a venv older than the file is
    reinstalled: the file is a prerequisite of make's install stamp)."""
    pinned = PINS.get(canonicalize_name(requirement.name))
    installed = Version(version(requirement.name))
    assert installed == pinned, (
        f"{requirement.name} {installed} is installed, constraints.txt pins {pinned}:"
        " run make install"
    )


def test_the_lint_tools_are_pinned_as_lint_infra_installs_them() -> None:
    """scripts/lint-infra.sh installs scripts/lint-tools.txt with constraints.txt: two
    different versions of one tool would fail its install."""
    tools = (ROOT / "scripts" / "lint-tools.txt").read_text().splitlines()
    for requirement in (Requirement(line) for line in tools if line and not line.startswith("#")):
        assert requirement.specifier.contains(PINS[canonicalize_name(requirement.name)]), (
            f"scripts/lint-tools.txt wants {requirement}, constraints.txt pins"
            f" {PINS[canonicalize_name(requirement.name)]}: run make lock"
        )
