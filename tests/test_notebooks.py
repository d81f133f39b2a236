"""The teaching notebooks in notebooks/: committed without outputs, and each runs top to bottom.

Each notebook is executed with nbclient in a fresh kernel that runs this interpreter (so the
notebooks see the same npsparse and default model as the tests), with notebooks/ as its working
directory. A notebook passes if no cell raises and it draws at least one matplotlib figure
(an ``image/png`` output). Its execution time is printed (shown with ``pytest -s``).
"""

import json
import sys
import time
from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"
PATHS = sorted(NOTEBOOKS.glob("*.ipynb"))
CELL_TIMEOUT = 900  # seconds per cell; the notebooks aim at well under a minute in total


def test_there_are_notebooks_and_the_readme_lists_them():
    assert len(PATHS) >= 5
    readme = (NOTEBOOKS / "README.md").read_text(encoding="utf-8")
    for path in PATHS:
        assert path.name in readme, f"notebooks/README.md does not mention {path.name}"


@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_is_committed_without_outputs(path):
    # Plain JSON, so this check needs no Jupyter packages.
    notebook = json.loads(path.read_text(encoding="utf-8"))
    for index, cell in enumerate(notebook["cells"]):
        if cell["cell_type"] != "code":
            continue
        assert cell.get("outputs") == [], f"{path.name} cell {index} has outputs; strip them"
        assert cell.get("execution_count") is None, (
            f"{path.name} cell {index} has an execution count; strip outputs before committing")


@pytest.fixture(scope="module")
def kernel_spec_dir(tmp_path_factory):
    """A kernelspec folder whose only kernel runs ``sys.executable`` with ipykernel.

    Named kernelspecs (``python3``) resolve through the user's and the system's Jupyter paths,
    which may point at another Python; this one cannot.
    """
    pytest.importorskip("ipykernel")
    folder = tmp_path_factory.mktemp("kernels")
    spec = folder / "npsparse-test"
    spec.mkdir()
    (spec / "kernel.json").write_text(json.dumps({
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": "npsparse tests",
        "language": "python",
    }))
    return folder


def _execute(path: Path, kernel_spec_dir: Path):
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    notebook = nbformat.read(path, as_version=4)
    specs = KernelSpecManager(kernel_dirs=[str(kernel_spec_dir)])
    manager = KernelManager(kernel_name="npsparse-test", kernel_spec_manager=specs)
    assert manager.kernel_spec.argv[0] == sys.executable
    client = nbclient.NotebookClient(notebook, km=manager, timeout=CELL_TIMEOUT,
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    start = time.perf_counter()
    # cleanup_kc: shut the kernel down afterwards even though this test, not nbclient, made its
    # manager (otherwise every notebook's kernel, holding a model, lives until pytest exits).
    client.execute(cleanup_kc=True)  # raises CellExecutionError, with the traceback, on failure
    return notebook, time.perf_counter() - start


@pytest.mark.model
@pytest.mark.slow
@pytest.mark.parametrize("path", PATHS, ids=[p.stem for p in PATHS])
def test_notebook_runs_and_plots(path, smollm2_path, kernel_spec_dir):
    notebook, seconds = _execute(path, kernel_spec_dir)
    print(f"\n{path.name}: executed in {seconds:.1f} s")
    outputs = [out for cell in notebook.cells if cell.cell_type == "code"
               for out in cell.get("outputs", [])]
    errors = [out for out in outputs if out.get("output_type") == "error"]
    assert not errors, f"{path.name}: {errors[0].get('ename')}: {errors[0].get('evalue')}"
    images = [out for out in outputs if "image/png" in out.get("data", {})]
    assert images, f"{path.name} drew no figure"
