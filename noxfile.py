"""Every check of the workspace, run through nox with uv (``uv run nox``; ``uv run nox -l`` lists).

Environments are synced from ``uv.lock`` (``uv sync --frozen``), so every session tests the
locked versions. ``tests`` gives each package an environment holding only that package, its
dependencies and the test tools, which proves that ``pip install dilated-X`` stands alone.
"""

from __future__ import annotations

import os
import shutil
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import nox

nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = False
nox.options.sessions = [
    "tests",
    "integration",
    "distributed",
    "lint",
    "typecheck",
    "docs",
    "build",
]

ROOT = Path(__file__).parent
PACKAGES = ["core", "kernels", "ring", "sparse", "longnet"]
SOURCES = [f"packages/dilated-{p}/src" for p in PACKAGES]
# The Triton interpreter runs kernels on the CPU; the test processes never see a GPU.
CPU_ENV = {"TRITON_INTERPRET": "1", "CUDA_VISIBLE_DEVICES": ""}
# `uv run` exports the path of its own binary as UV; fall back to PATH when nox runs alone.
UV = os.environ.get("UV") or shutil.which("uv") or "uv"


def sync(session: nox.Session, *args: str) -> None:
    """Install the locked environment described by ``args`` into the session's virtualenv."""
    session.run_install(
        UV,
        "sync",
        "--frozen",
        "--no-default-groups",
        *args,
        env={"UV_PROJECT_ENVIRONMENT": session.virtualenv.location},
        external=True,
    )


def pytest_args(session: nox.Session, *paths: str) -> list[str]:
    return ["pytest", "-q", "--timeout=900", *paths, *session.posargs]


@nox.session
@nox.parametrize("package", PACKAGES)
def tests(session: nox.Session, package: str) -> None:
    """One package's tests in an environment with only that package (CPU only)."""
    sync(session, "--package", f"dilated-{package}", "--group", "test")
    tests_dir = f"packages/dilated-{package}/tests"
    if not any(Path(tests_dir).glob("test_*.py")):
        session.run("python", "-c", f"import dilated.{package}")
        session.skip(f"dilated-{package} has no tests yet (import checked)")
    session.run(*pytest_args(session, tests_dir, "-m", "not distributed and not gpu"), env=CPU_ENV)


@nox.session
def integration(session: nox.Session) -> None:
    """All packages together: cross-package tests, docs snippets, and the CLI end to end."""
    sync(session, "--all-packages", "--group", "test", "--group", "docs")
    session.run(*pytest_args(session, "tests"), env=CPU_ENV)
    session.run("dilated", "info", env=CPU_ENV)
    session.run("dilated", "check", env=CPU_ENV)


@nox.session
def distributed(session: nox.Session) -> None:
    """Multi-process (gloo, CPU) equivalence tests of the sequence-parallel attention."""
    # DeepSpeed comes in as dilated-ring's extra, so its ZeRO test runs here too (CPU accelerator).
    sync(session, "--all-packages", "--group", "test", "--extra", "deepspeed")
    session.run(
        *pytest_args(
            session,
            "packages/dilated-ring/tests",
            "packages/dilated-sparse/tests",
            "-m",
            "distributed",
        ),
        env={**CPU_ENV, "DS_ACCELERATOR": "cpu"},
        success_codes=[0, 5],
    )


@nox.session
def gpu(session: nox.Session) -> None:
    """The CUDA tests (``-m gpu``); skips cleanly on a machine without CUDA."""
    sync(session, "--all-packages", "--group", "test")
    # One run per package, so that each package reports its own GPU results.
    for package in PACKAGES:
        session.run(
            *pytest_args(session, f"packages/dilated-{package}/tests", "-m", "gpu"),
            success_codes=[0, 5],
        )


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check."""
    sync(session, "--only-group", "lint")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def typecheck(session: nox.Session) -> None:
    """mypy (strict) over every package's sources."""
    # transformers (dilated-longnet's hf extra) is needed to check dilated.longnet.hf.
    sync(session, "--all-packages", "--group", "lint", "--extra", "hf")
    session.run("mypy", *SOURCES)


@nox.session
def docs(session: nox.Session) -> None:
    """Build the documentation site with warnings as errors."""
    sync(session, "--all-packages", "--group", "docs")
    session.run(
        "mkdocs",
        "build",
        "--strict",
        "--site-dir",
        str(Path(tempfile.mkdtemp()) / "site"),
        env={"NO_MKDOCS_2_WARNING": "1"},
    )


@nox.session
def build(session: nox.Session) -> None:
    """Build each package's sdist and wheel, install each wheel alone in a fresh venv, import it."""
    sync(session, "--only-group", "test")
    dist = Path(tempfile.mkdtemp(prefix="dilated-dist-"))
    session.run(UV, "build", "--all-packages", "--out-dir", str(dist), external=True)
    wheels = sorted(dist.glob("*.whl"))
    if len(wheels) != len(PACKAGES):
        session.error(f"expected {len(PACKAGES)} wheels, got {[w.name for w in wheels]}")
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as zf:
            names = zf.namelist()
        if "dilated/__init__.py" in names:
            session.error(f"{wheel.name} ships dilated/__init__.py: dilated must stay a namespace")
        if not any(n.endswith(".dist-info/licenses/LICENSE") for n in names):
            session.error(f"{wheel.name} does not ship its LICENSE")
    for sdist in sorted(dist.glob("*.tar.gz")):
        with tarfile.open(sdist) as tf:
            if not any(n.endswith("/LICENSE") for n in tf.getnames()):
                session.error(f"{sdist.name} does not ship its LICENSE")
    for package in PACKAGES:
        venv = dist / f"venv-{package}"
        session.run(UV, "venv", "--quiet", "--python", sys.executable, str(venv), external=True)
        python = str(venv / "bin" / "python")
        # --find-links lets a wheel's dilated-core dependency resolve to the one just built.
        session.run(
            UV,
            "pip",
            "install",
            "--quiet",
            "--python",
            python,
            "--find-links",
            str(dist),
            f"dilated-{package}",
            external=True,
        )
        session.run(
            python, "-c", f"import dilated.{package} as m; print(m.__name__, 'ok')", external=True
        )
    shutil.rmtree(dist, ignore_errors=True)


@nox.session(default=False)
def bench(session: nox.Session) -> None:
    """Benchmarks (GPU when present): kernels, then the CLI table."""
    sync(session, "--all-packages", "--group", "test", "--group", "docs")
    for script in ("benchmarks/kernels.py", "benchmarks/memory_pool.py"):
        if Path(script).exists():
            session.run("python", script, *session.posargs)


@nox.session(default=False)
def multigpu(session: nox.Session) -> None:
    """NCCL equivalence under torchrun, one process per GPU (needs CUDA; skips otherwise)."""
    sync(session, "--all-packages", "--group", "test")
    script = ROOT / "packages/dilated-ring/tests/multigpu_equivalence.py"
    nproc = os.environ.get("NPROC", "")
    if not nproc:
        nproc = session.run(
            "python", "-c", "import torch; print(torch.cuda.device_count())", silent=True
        ).strip()  # type: ignore[union-attr]
    if nproc in ("", "0"):
        session.skip("no CUDA device")
    env = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1"}
    session.run("torchrun", f"--nproc-per-node={nproc}", str(script), env=env)
    if (ROOT / "benchmarks/ring.py").exists():
        session.run("torchrun", f"--nproc-per-node={nproc}", "benchmarks/ring.py", env=env)
