"""The evaluation notebook runs end to end on a tiny run and draws its figures.

It is executed with nbclient in a kernel of this interpreter, parameters passed through the
environment variables its first cell reads, on one tiny DenseNet121 run (any backbone's run is
the same to it: the model is the run folder's business). It runs twice: first with an empty
PRED_DIR, which it fills by predicting; then with that PRED_DIR, whose predictions it must use
as they are.
"""

from __future__ import annotations

import json
from pathlib import Path

import nbformat
import pytest
from nbclient import NotebookClient


REPO = Path(__file__).resolve().parents[1]
NOTEBOOKS = ("Evaluate.ipynb",)


@pytest.fixture(scope="module")
def run(shared_data):
    """A synthetic set at 256 px and a DenseNet121 run trained for one step at 128 px."""
    return shared_data.tiny_run()


def execute(name: str, cwd: Path) -> nbformat.NotebookNode:
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    NotebookClient(nb, kernel_name="python3", timeout=300, resources={"metadata": {"path": str(cwd)}}).execute()
    return nb


def figures(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.outputs)


def assert_scored(nb, data: Path, pred: Path) -> None:
    """The notebook's eval.json scores PRED_DIR's submission against DATA_DIR's solution as
    evaluate_files does, and the notebook prints that mAP."""
    from hpa_scc.evaluation.metric import evaluate_files
    from hpa_scc.evaluation.submission import read_submission

    saved = json.loads((pred / "eval.json").read_text())
    expected = evaluate_files(data / "solution.csv", pred / "submission.csv")
    assert Path(saved["submission"]).resolve() == (pred / "submission.csv").resolve()
    assert saved["images"]["n_images"] == expected.n_images == len(read_submission(data / "solution.csv"))
    assert 0 <= saved["mAP"] <= 1 and saved["mAP"] == pytest.approx(expected.mAP)
    printed = "".join(out.get("text", "") for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs)
    assert f"mAP {expected.mAP:.6f}" in printed


@pytest.mark.parametrize("name", NOTEBOOKS)
def test_committed_without_outputs_and_parameters_first(name):
    nb = nbformat.read(REPO / "notebooks" / name, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(c.outputs == [] and c.execution_count is None for c in code)
    assert "parameters" in code[0].metadata.get("tags", [])
    for var in ("HPA_RUN_DIR", "HPA_DATA_DIR", "HPA_PRED_DIR", "HPA_N_IMAGES"):
        assert var in code[0].source
    assert nb.metadata.kernelspec.name == "python3"


@pytest.mark.slow
def test_notebooks_execute_and_draw(run, kernel_env, tmp_path, monkeypatch):
    monkeypatch.setenv("HPA_RUN_DIR", str(run / "run"))
    monkeypatch.setenv("HPA_DATA_DIR", str(run / "set"))
    monkeypatch.setenv("HPA_N_IMAGES", "2")
    pred = tmp_path / "pred"
    for name in NOTEBOOKS * 2:  # the first run predicts into the empty PRED_DIR, the second finds its predictions
        monkeypatch.setenv("HPA_PRED_DIR", str(pred))
        before = (pred / "submission.csv").stat().st_mtime_ns if (pred / "submission.csv").exists() else None
        nb = execute(name, tmp_path)
        errors = [out for cell in nb.cells if cell.cell_type == "code" for out in cell.outputs
                  if out.output_type == "error"]
        assert not errors, errors
        # per-class AP, PR curves, training curves and the two images shown
        assert figures(nb) == 5, name
        assert_scored(nb, run / "set", pred)
        if before is not None:
            assert (pred / "submission.csv").stat().st_mtime_ns == before  # existing predictions are used
