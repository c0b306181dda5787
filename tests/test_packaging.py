"""Packaging: the type stub of the compiled module matches it (mypy.stubtest), the README example
passes mypy --strict, signatures are embedded, the package is marked typed; and, from a source
tree, the sdist carries every source the build needs and no generated C, the LICENSE and the
metadata. The slow path (sdist -> wheel -> install -> demo and tests; the manylinux wheels) runs
in .ci/run with tools/build_wheels.sh and tools/check_wheel.sh."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

import llmdist

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
PKG = Path(llmdist.__file__).resolve().parent
INSTALLED = PKG.parent.name in ("site-packages", "dist-packages")


def source_tree():
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("needs the source tree (these tests run beside an installed wheel)")


def mypy(*args, cwd, config=""):
    """python -m mypy ARGS in cwd; a checkout's llmdist is found through MYPYPATH and its own
    errors are not counted (only the program under test's), an installed one through py.typed."""
    cfg = Path(cwd) / "mypy.ini"
    cfg.write_text(
        "[mypy]\n" + config + ("" if INSTALLED else "[mypy-llmdist.*]\nignore_errors = True\n")
    )
    env = dict(os.environ)
    env.pop("MYPYPATH", None)
    if not INSTALLED:
        env["MYPYPATH"] = str(PKG.parent)
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy",
            "--config-file",
            str(cfg),
            "--cache-dir",
            str(Path(cwd) / ".mypy_cache"),
            *args,
        ],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_package_is_typed():
    assert (PKG / "py.typed").is_file()
    assert (PKG / "_core.pyi").is_file()


def test_stub_matches_the_compiled_module(tmp_path):
    cfg = tmp_path / "stubtest.ini"
    # the rest of the package is read only for the stub's imports
    cfg.write_text("[mypy]\nignore_missing_imports = True\nfollow_imports = silent\n")
    env = dict(os.environ)
    if not INSTALLED:
        env["MYPYPATH"] = env["PYTHONPATH"] = str(PKG.parent)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "llmdist._core",
            "--concise",
            "--mypy-config-file",
            str(cfg),
            "--allowlist",
            str(HERE / "stubtest_allowlist.txt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout + res.stderr


def test_stubtest_finds_a_wrong_stub(tmp_path):
    """The check above can fail: the same run on a stub with one parameter renamed does."""
    stub_dir = tmp_path / "stubs" / "llmdist"
    stub_dir.mkdir(parents=True)
    text = (PKG / "_core.pyi").read_text()
    wrong = text.replace("def plan_c2c(nbytes: int)", "def plan_c2c(size: int)")
    assert wrong != text
    (stub_dir / "_core.pyi").write_text(wrong)
    (stub_dir / "__init__.pyi").write_text("")
    (stub_dir / "status.pyi").write_text(
        "from typing import Any\nLLMException: Any\nLLMStatusCode: Any\n"
    )
    cfg = tmp_path / "stubtest.ini"
    cfg.write_text("[mypy]\nignore_missing_imports = True\n")
    env = dict(os.environ, MYPYPATH=str(tmp_path / "stubs"))
    if not INSTALLED:
        env["PYTHONPATH"] = str(PKG.parent)
    res = subprocess.run(
        [
            sys.executable,
            "-m",
            "mypy.stubtest",
            "llmdist._core",
            "--concise",
            "--mypy-config-file",
            str(cfg),
            "--allowlist",
            str(HERE / "stubtest_allowlist.txt"),
        ],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode != 0
    assert "llmdist._core.plan_c2c is inconsistent" in res.stdout


def readme_example() -> str:
    readme = ROOT / "README.md"
    if not readme.exists():
        pytest.skip("needs the README (a source tree, or tools/check_wheel.sh's copy)")
    text = readme.read_text()
    usage = text[text.index("## Usage") :]
    return re.search(r"```python\n(.*?)```", usage, re.S).group(1)


def test_readme_example_passes_mypy_strict(tmp_path):
    (tmp_path / "example.py").write_text(readme_example())
    res = mypy("--strict", "example.py", cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr


def test_mypy_strict_sees_the_types(tmp_path):
    """A wrong call is an error, so the example's pass means the types are checked, not Any."""
    (tmp_path / "wrong.py").write_text(
        "import llmdist\nfrom llmdist import BlocksCacheKey\n"
        "rt: int = llmdist.Event\n"
        "k: str = BlocksCacheKey(1, 0).prompt_cluster_id\n"
    )
    res = mypy("--strict", "wrong.py", cwd=tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr
    assert (
        'wrong.py:3: error: Incompatible types in assignment (expression has type "type[Event]"'
        in res.stdout
    ), res.stdout


def test_signatures_are_embedded():
    assert list(inspect.signature(llmdist.Event).parameters) == ["runtime", "handle"]
    assert list(inspect.signature(llmdist.Stream).parameters) == ["runtime"]
    assert list(inspect.signature(llmdist.set_host_tuning).parameters) == [
        "copy_threads",
        "split_min_bytes",
        "stream_store_min_bytes",
        "stream_store_short_batch_bytes",
    ]
    assert llmdist.Event.__doc__.startswith("A runtime event")


# ------------------------------------------------------------------------------------------
# From a source tree


def test_license_is_apache_2():
    source_tree()
    text = (ROOT / "LICENSE").read_text()
    assert text.lstrip().startswith(
        "Apache License\n                           Version 2.0, January 2004"
    )
    assert "END OF TERMS AND CONDITIONS" in text
    assert '\nlicense = "Apache-2.0"\n' in (ROOT / "pyproject.toml").read_text()


def pyproject() -> dict:
    source_tree()
    try:
        import tomllib
    except ImportError:
        tomllib = pytest.importorskip(
            "tomli", reason="reading pyproject.toml needs tomllib (3.11+) or tomli"
        )
    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_metadata():
    data = pyproject()
    project = data["project"]
    assert project["requires-python"] == ">=3.9"
    assert "version" in project["dynamic"]
    assert data["tool"]["setuptools"]["dynamic"]["version"] == {"attr": "llmdist.__version__"}
    assert project["license-files"] == ["LICENSE"]
    assert project["authors"] and project["keywords"]
    for v in ("3.9", "3.10", "3.11", "3.12", "3.13"):
        assert f"Programming Language :: Python :: {v}" in project["classifiers"]
    assert project["scripts"] == {"llmdist": "llmdist.cli:main"}
    requires = data["build-system"]["requires"]
    assert "Cython>=3.0,<4" in requires
    assert not any(r.startswith("numpy") for r in requires)  # nothing cimports numpy
    extras = project["optional-dependencies"]
    assert any("aarch64" in r for r in extras["mooncake"])
    assert any("mooncake-transfer-engine-npu" in r for r in extras["mooncake-npu"])
    # a relative image does not show on PyPI
    assert not re.search(r"!\[[^\]]*\]\((?!https?://)", (ROOT / "README.md").read_text())


def test_sdist_has_every_source_and_no_generated_c(tmp_path):
    source_tree()
    pytest.importorskip("Cython", reason="setup.py needs Cython to make the sdist")
    (tmp_path / "egg").mkdir()
    res = subprocess.run(
        [
            sys.executable,
            "setup.py",
            "-q",
            "egg_info",
            "--egg-base",
            str(tmp_path / "egg"),
            "sdist",
            "-d",
            str(tmp_path),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr
    (sdist,) = tmp_path.glob("llmdist-*.tar.gz")
    with tarfile.open(sdist) as tar:
        names = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
    tracked = subprocess.run(
        ["git", "ls-files", "llmdist", "src", "include", "tools", "tests"],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    if tracked.returncode != 0:
        pytest.skip("the source tree is not a git checkout")
    want = set(tracked.stdout.split()) | {"LICENSE", "README.md", "pyproject.toml", "setup.py"}
    assert want - names == set()
    for must in (
        "llmdist/_core.pyx",
        "llmdist/_core.pxd",
        "llmdist/_runtime.pxi",
        "llmdist/copy_runs.ptx",
        "src/cuda/copy_runs.cu",
        "tools/build_ptx.py",
        "tests/helpers.py",
    ):
        assert must in names
    assert "llmdist/_core.c" not in names
    assert not [n for n in names if n.endswith((".so", ".o"))]
