"""The Colab demo notebook executes top to bottom on the CPU (slow: run with `pytest -m slow`)."""

from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "notebooks" / "pass_jax_demo.ipynb"


@pytest.mark.slow
def test_demo_notebook_runs(monkeypatch):
    import nbclient
    import nbformat

    monkeypatch.setenv("PASS_JAX_DEMO_STEPS", "20")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parents[1])}}).execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", []))
    assert "identical greedy output: True" in outputs
    assert '"tokens_per_forward"' in outputs  # the training run's metrics were printed
