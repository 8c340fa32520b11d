"""nbval executes every notebook, in order, under the smoke preset.

The stored notebooks default to the quick preset. Like the runner, the test injects the smoke
parameters with papermill (without executing), then hands the copies to nbval in one pytest
process so that they share one run directory.
"""

import subprocess
import sys
from pathlib import Path

import nbformat
import papermill
import pytest
from papermill.iorw import load_notebook_node
from papermill.parameterize import parameterize_notebook

from fcre_utils.runner import list_notebooks

pytestmark = pytest.mark.slow


def test_stored_notebooks_clean():
    for path in list_notebooks():
        notebook = nbformat.read(path, as_version=4)
        assert notebook.metadata.kernelspec.name == "python3", path.name
        tagged = [c for c in notebook.cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1, path.name
        assert all(not c.get("outputs") for c in notebook.cells if c.cell_type == "code"), path.name
        assert "run_dir" in papermill.inspect_notebook(str(path)), path.name


def test_notebooks_under_nbval(npz_dataset, tmp_path):
    run_dir = tmp_path / "run"
    values = {"run_dir": str(run_dir), "preset": "smoke", "overrides": {"dataset": str(npz_dataset)}}
    copies = []
    for path in list_notebooks():
        notebook = load_notebook_node(str(path))
        declared = papermill.inspect_notebook(str(path))
        notebook = parameterize_notebook(notebook, {k: v for k, v in values.items() if k in declared})
        copy = tmp_path / path.name
        nbformat.write(notebook, copy)
        copies.append(str(copy))

    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    result = subprocess.run(
        [sys.executable, "-m", "pytest", "--nbval-lax", "-p", "no:cacheprovider", "-q", "-c", str(tmp_path / "pytest.ini"), *copies],
        cwd=Path(list_notebooks()[0]).parent, capture_output=True, text=True, timeout=900,
    )
    assert result.returncode == 0, result.stdout[-4000:]
    assert "failed" not in result.stdout.splitlines()[-1]
    assert (run_dir / "metrics.csv").is_file()
    assert (run_dir / "audit" / "report.md").is_file()
