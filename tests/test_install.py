"""Installing as users do: the build's decisions in setup.py (isolated builds, the CUDA
toolkit), the sdist's contents, and the message when pdepth._C cannot be loaded (a source
tree shadowing the installed package). The full sdist build + install is `make sdist-check`
(run by CI); these tests only run setup.py's checks, which stop before compiling."""

from __future__ import annotations

import importlib
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
from pathlib import Path

import pytest
import torch

knn_mod = importlib.import_module("pdepth.knn")

ROOT = Path(__file__).resolve().parents[1]
EXT_SUFFIX = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
HAS_SETUP = (ROOT / "setup.py").exists() and (ROOT / "csrc").is_dir()


def _env(**extra):
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("FORCE_CUDA", "FORCE_CPU", "CUDA_HOME", "CUDA_PATH")
    }
    env.update(extra)
    return env


@pytest.fixture(scope="module")
def checkout(tmp_path_factory):
    """A copy of the source checkout: setup.py runs write egg-info (and, for CUDA, a build/
    folder) beside setup.py, which must not touch the real tree."""
    if not HAS_SETUP:
        pytest.skip("not run from a source checkout")
    dst = tmp_path_factory.mktemp("checkout") / "src"
    shutil.copytree(
        ROOT,
        dst,
        ignore=shutil.ignore_patterns(
            ".git",
            ".venv",
            "build",
            "dist",
            "*.egg-info",
            "*.so",
            "__pycache__",
            "runs",
            ".*cache",
            ".benchmarks",
            ".hypothesis",
            "*.log",
        ),
    )
    return dst


def _setup_py(args, cwd, **env):
    return subprocess.run(
        [sys.executable, "setup.py", *args],
        cwd=cwd,
        env=_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


# ---- the message when pdepth._C does not load ---------------------------------------------


def _fake_checkout(root: Path, built: bool = False) -> Path:
    pkg = root / "pdepth"
    pkg.mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (root / "setup.py").write_text("")
    (root / "csrc").mkdir()
    if built:
        (pkg / f"_C{EXT_SUFFIX}").write_bytes(b"")
    return pkg


def _fake_installed(site: Path) -> Path:
    (site / "pdepth").mkdir(parents=True)
    so = site / "pdepth" / f"_C{EXT_SUFFIX}"
    so.write_bytes(b"")
    return so


MISSING = ImportError(
    "cannot import name '_C' from partially initialized module 'pdepth' "
    "(most likely due to a circular import)"
)


def test_message_source_tree_shadows_installed(tmp_path):
    pkg = _fake_checkout(tmp_path / "src")
    so = _fake_installed(tmp_path / "site")
    msg = knn_mod._load_failure_message(
        MISSING, str(pkg), [str(tmp_path / "src"), str(tmp_path / "site")]
    )
    assert "circular import" not in msg
    assert "shadows the installed pdepth" in msg and str(so) in msg
    assert "run from outside the source tree" in msg
    assert "pip install --no-build-isolation -e ." in msg


def test_message_unbuilt_source_tree(tmp_path):
    pkg = _fake_checkout(tmp_path / "src")
    msg = knn_mod._load_failure_message(MISSING, str(pkg), [str(tmp_path / "src")])
    assert "circular import" not in msg
    assert "no compiled pdepth/_C*.so in the source tree" in msg
    assert "pip install --no-build-isolation -e ." in msg


def test_message_broken_build_names_the_error(tmp_path):
    pkg = _fake_checkout(tmp_path / "src", built=True)
    err = ImportError("undefined symbol: _ZN3c10foo")
    msg = knn_mod._load_failure_message(err, str(pkg), [str(tmp_path / "src")])
    assert "undefined symbol: _ZN3c10foo" in msg and "another torch" in msg


def test_message_installed_without_extension(tmp_path):
    pkg = tmp_path / "site" / "pdepth"
    pkg.mkdir(parents=True)
    msg = knn_mod._load_failure_message(MISSING, str(pkg), [str(tmp_path / "site")])
    assert "circular import" not in msg
    assert "pip install --no-build-isolation ." in msg


@pytest.mark.slow
def test_shadowed_source_tree_warns_end_to_end(tmp_path):
    """A checkout without a build, run from its root, with an installed pdepth (with _C)
    further down sys.path: pdepth falls back to the reference and says why."""
    src = tmp_path / "src"
    shutil.copytree(
        Path(knn_mod.__file__).parent,
        src / "pdepth",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    (src / "setup.py").write_text("")
    (src / "csrc").mkdir()
    _fake_installed(tmp_path / "site")
    code = (
        # a dev env's editable install of the real checkout would resolve pdepth._C by name
        "import sys\n"
        "sys.meta_path[:] = [f for f in sys.meta_path if 'editable' not in f.__module__]\n"
        "import warnings, torch, pdepth\n"
        f"assert pdepth.__file__.startswith({str(src)!r}), pdepth.__file__\n"
        "assert pdepth.backend() == 'reference'\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    x = torch.randn(20, 4)\n"
        "    pdepth.knn(x[:3], x, k=2)\n"
        "print('\\n'.join(str(m.message) for m in w))\n"
        "print('ERROR', pdepth.build_info()['error'])\n"
    )
    env = _env(PYTHONPATH=str(tmp_path / "site"))
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=src, env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr
    assert "shadows the installed pdepth" in out.stdout, out.stdout
    assert "run from outside the source tree" in out.stdout
    assert "circular import" not in out.stdout


# ---- setup.py: isolated builds and the CUDA toolkit -----------------------------------------


def test_isolated_build_stops_with_a_clear_message(checkout, tmp_path):
    """torch coming from pip's build env (an unpinned `requires = [torch]` would put it
    there) must not be compiled against."""
    fake = tmp_path / "pip-build-env-abc123" / "overlay"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("__version__ = '0.0'\n")
    out = _setup_py(["bdist_wheel"], checkout, PYTHONPATH=str(fake))
    assert out.returncode != 0
    assert "isolated build environment" in out.stderr
    assert "pip install --no-build-isolation ." in out.stderr


def test_build_without_torch_says_to_disable_isolation(checkout, tmp_path):
    fake = tmp_path / "overlay"
    (fake / "torch").mkdir(parents=True)
    (fake / "torch" / "__init__.py").write_text("raise ImportError('no torch here')\n")
    out = _setup_py(["bdist_wheel"], checkout, PYTHONPATH=str(fake))
    assert out.returncode != 0
    assert "pip install --no-build-isolation ." in out.stderr
    # metadata alone (an isolated `python -m build --sdist`) needs no torch
    out = _setup_py(["--name"], checkout, PYTHONPATH=str(fake))
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "pdepth"


def test_build_system_does_not_pull_torch():
    tomllib = pytest.importorskip("tomllib")
    if not (ROOT / "pyproject.toml").exists():
        pytest.skip("not run from a source checkout")
    requires = tomllib.loads((ROOT / "pyproject.toml").read_text())["build-system"]["requires"]
    assert not any(r.lower().startswith("torch") for r in requires), requires


@pytest.mark.skipif(torch.version.cuda is None, reason="torch is a CPU build")
@pytest.mark.slow
def test_unusable_toolkit_falls_back_to_cpu(checkout, tmp_path):
    """A CUDA_HOME without cudart (e.g. /usr/local when nvcc on PATH is a wrapper): CPU-only
    build with the reason, or an error with FORCE_CUDA=1."""
    home = tmp_path / "cuda"
    (home / "bin").mkdir(parents=True)
    nvcc = home / "bin" / "nvcc"
    nvcc.write_text("#!/bin/sh\necho 'Cuda compilation tools, release 99.0, V99.0.0'\n")
    nvcc.chmod(0o755)
    out = _setup_py(["--name"], checkout, CUDA_HOME=str(home))
    assert out.returncode == 0, out.stderr
    assert (
        f"pdepth: building CPU only (the CUDA toolkit at {home} ($CUDA_HOME) is unusable"
        in out.stdout
    )
    out = _setup_py(["--name"], checkout, CUDA_HOME=str(home), FORCE_CUDA="1")
    assert out.returncode != 0
    assert "FORCE_CUDA=1 but the CUDA toolkit" in out.stderr


def test_force_cpu(checkout):
    out = _setup_py(["--name"], checkout, FORCE_CPU="1", FORCE_CUDA="1")
    assert out.returncode == 0, out.stderr
    assert "pdepth: building CPU only (FORCE_CPU=1)" in out.stdout


# ---- the sdist ----------------------------------------------------------------------------


@pytest.mark.slow
def test_sdist_has_every_source_and_header(checkout, tmp_path):
    out = _setup_py(["-q", "sdist", "-d", str(tmp_path / "dist")], checkout, FORCE_CPU="1")
    assert out.returncode == 0, out.stderr
    (tarball,) = (tmp_path / "dist").glob("pdepth-*.tar.gz")
    with tarfile.open(tarball) as tf:
        names = {n.split("/", 1)[1] for n in tf.getnames() if "/" in n}
    wanted = {str(p.relative_to(ROOT)) for p in (ROOT / "csrc").rglob("*") if p.is_file()}
    wanted |= {"setup.py", "pyproject.toml", "MANIFEST.in", "README.md"}
    # every module of every subpackage (a package list by hand once left pdepth/depth/ out)
    wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / "pdepth").rglob("*.py")}
    assert wanted <= names, sorted(wanted - names)
    assert not any(n.endswith(".so") for n in names)
