"""One source of truth for versions: requirements.txt. pip (pyproject), conda and Binder all read it."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, _, version = line.partition("==")
            assert version, f"requirements.txt: {line!r} is not pinned with =="
            pins[name.lower()] = version
    return pins


def test_every_requirement_is_pinned_and_torch_is_2_13():
    pins = _pins()
    assert pins["torch"] == "2.13.0"
    assert pins["deepspeed"] == "0.19.8"
    for name in ("accelerate", "pandas", "jupyterlab", "ipywidgets", "panel", "pydantic"):
        assert name in pins


def test_pyproject_reads_its_dependencies_from_requirements():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert "dependencies" in py["project"]["dynamic"]
    assert py["tool"]["setuptools"]["dynamic"]["dependencies"]["file"] == ["requirements.txt"]


def test_pyproject_lists_every_shardlab_package():
    """A subpackage missing from the explicit list would be left out of a non-editable install."""
    listed = set(tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"])
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "shardlab").rglob("__init__.py")}
    assert found <= listed, f"add to [tool.setuptools] packages: {sorted(found - listed)}"


def _pip_section(env_file: Path) -> list[str]:
    env = yaml.safe_load(env_file.read_text())
    pip = [d for d in env["dependencies"] if isinstance(d, dict) and "pip" in d]
    assert len(pip) == 1, f"{env_file}: one pip section"
    conda = [d for d in env["dependencies"] if isinstance(d, str)]
    # conda installs only python and pip itself; every library version comes from requirements.txt.
    assert all(re.match(r"^(python(=[\d.]+)?|pip)$", d) for d in conda), conda
    return pip[0]["pip"]


def test_environment_yml_agrees_with_pip_setup():
    lines = _pip_section(ROOT / "environment.yml")
    assert "-r requirements.txt" in lines
    assert not [ln for ln in lines if "==" in ln], "no second set of pins"


def test_binder_environment_agrees_with_pip_setup():
    lines = _pip_section(ROOT / "binder" / "environment.yml")
    assert "-r ../requirements.txt" in lines
    assert not [ln for ln in lines if "==" in ln]
    assert (ROOT / "binder" / "start").stat().st_mode & 0o111


def test_python_version_in_conda_files_meets_pyproject():
    py = tomllib.loads((ROOT / "pyproject.toml").read_text())
    minimum = tuple(int(x) for x in re.findall(r"\d+", py["project"]["requires-python"]))
    for f in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        env = yaml.safe_load(f.read_text())
        ver = next(d for d in env["dependencies"] if isinstance(d, str) and d.startswith("python="))
        assert tuple(int(x) for x in ver.split("=")[1].split(".")) >= minimum
