"""notebooks/quickstart.ipynb runs from top to bottom (CI executes it; any cell error
fails). Its own cells assert what they show: the export's probabilities equal the
trainer's predict to 1e-5."""

import os

import pytest

nbclient = pytest.importorskip("nbclient", reason="the notebook test needs nbclient "
                               "(make test installs it)")
import nbformat  # pylint: disable=g-import-not-at-top,wrong-import-position

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path):
  nb = nbformat.read(NOTEBOOK, as_version=4)
  client = nbclient.NotebookClient(
      nb, timeout=900, kernel_name="python3",
      resources={"metadata": {"path": os.path.dirname(NOTEBOOK)}})
  client.execute()  # raises CellExecutionError naming the failing cell
  outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                    for o in c.get("outputs", []))
  assert "max |served - trainer| probability" in outputs
  assert "test accuracy" in outputs
