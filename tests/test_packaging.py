"""The package as users install it: packaged resources, the version, import cost, the README API snippet, a wheel."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.resources import resource_path

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("parts", [("configs", "demo.yaml"), ("datasets", "phantom", "dataset.yaml")])
def test_packaged_resources_equal_the_user_facing_copies(parts):
    # configs/ and datasets/ at the top are what users read and adapt; the package carries the same bytes
    assert resource_path(*parts).read_bytes() == REPO_ROOT.joinpath(*parts).read_bytes(), (
        f"pipeline/resources/{'/'.join(parts)} and {'/'.join(parts)} differ: copy one onto the other")


def test_missing_resource_is_one_clear_error():
    with pytest.raises(FileNotFoundError, match="must exist"):
        resource_path("configs", "no-such.yaml")


def test_version_comes_from_the_installed_metadata():
    import tomllib
    from importlib import metadata

    import pipeline

    declared = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert pipeline.__version__ == metadata.version("ctseg") == declared


def test_config_does_not_import_heavy_libraries():
    # the settings dataclasses live in options modules; the DICOM, metric and network code load only when used
    probe = subprocess.run([sys.executable, "-c", "import sys, pipeline.config, pipeline.demo_options; "
                            "print(sorted(m for m in ('torch', 'monai', 'pydicom', 'SimpleITK', 'nibabel') "
                            "if m in sys.modules))"],
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.strip() == "[]"


def _readme_api_snippet() -> str:
    text = (REPO_ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    snippets = [block for block in blocks if "from pipeline import api" in block]
    assert len(snippets) == 1, "the README must hold exactly one Python API snippet"
    return snippets[0]


def test_readme_api_snippet_names_real_functions():
    from pipeline import api, config, demo

    snippet = _readme_api_snippet()
    for module, name in re.findall(r"\b(api|config|demo)\.(\w+)\(", snippet):
        assert hasattr({"api": api, "config": config, "demo": demo}[module], name), f"{module}.{name}"


@pytest.mark.slow
def test_readme_api_snippet_runs(tmp_path):
    snippet = _readme_api_snippet()
    overrides = re.search(r"load_config\(\[[^\]]*\], (\[[^\]]*\])\)", snippet)
    assert overrides, "the snippet's load_config call must list its overrides"
    tiny = (f'["output_root={tmp_path}", "experiment=trial", "demo.train_cases=2", "demo.test_cases=1", '
            f'"demo.in_plane_size=96", "demo.slices=48", "train.max_steps=4", "train.val_every=4", '
            f'"train.patch_size=null"]')
    code = snippet.replace(overrides.group(1), tiny)
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "trial" / "evaluate" / "report.json").is_file()


@pytest.mark.slow
def test_wheel_installs_and_runs_the_demo_from_any_folder(tmp_path):
    """Build the wheel, install it (no editable link) into a fresh folder and run a short demo elsewhere."""
    wheels = tmp_path / "wheels"
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(wheels), str(REPO_ROOT)], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next(wheels.glob("ctseg-*.whl"))
    site = tmp_path / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(site),
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    # the dependencies come from this environment; the package itself only from the installed wheel
    env = {**os.environ, "PYTHONPATH": str(site)}
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = subprocess.run([sys.executable, "-c", "import pipeline; print(pipeline.__file__)"], cwd=elsewhere,
                           env=env, capture_output=True, text=True, timeout=120)
    assert Path(where.stdout.strip()).is_relative_to(site), where.stdout + where.stderr
    demo = subprocess.run([sys.executable, "-m", "pipeline", "demo", "--output", str(tmp_path / "out"),
                           "--set", "demo.train_cases=2", "--set", "demo.test_cases=1",
                           "--set", "demo.in_plane_size=96", "--set", "demo.slices=48",
                           "--set", "train.max_steps=4", "--set", "train.val_every=4",
                           "--set", "train.patch_size=null"],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900)
    assert demo.returncode in (0, 1), demo.stderr[-3000:]  # 1 = ran, but 4 steps stay below the Dice target
    assert "Traceback" not in demo.stderr and "Mean foreground Dice" in demo.stdout
    assert (tmp_path / "out" / "evaluate" / "report.json").is_file()


@pytest.mark.parametrize("code, env, expected", [
    ("import pipeline, numpy", {}, False),           # pipeline first: through the environment variable
    ("import numpy, pipeline", {}, False),           # numpy first (a library user): through numpy's setter
    ("import pipeline, numpy", {"NUMPY_MADVISE_HUGEPAGE": "1"}, True),  # the user's explicit choice wins
])
def test_numpy_asks_for_no_huge_pages_unless_the_user_says_so(code, env, expected):
    probe = (f"{code}\nfrom numpy._core.multiarray import _set_madvise_hugepage\n"
             "print(_set_madvise_hugepage(True))")
    environment = {k: v for k, v in os.environ.items() if k != "NUMPY_MADVISE_HUGEPAGE"} | env
    out = subprocess.run([sys.executable, "-c", probe], env=environment, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == str(expected)
