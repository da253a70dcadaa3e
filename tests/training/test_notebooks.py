"""The notebooks run top to bottom, at their small size (ADAFACTOR_NOTEBOOK_SMALL=1)."""

from __future__ import annotations

import json
import math
import re
import sys
from pathlib import Path

import pytest

nbclient = pytest.importorskip("nbclient")
nbformat = pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

from adafactor_jax.training import sweep  # noqa: E402
from adafactor_jax.training.configs import paper  # noqa: E402

NOTEBOOKS = Path(__file__).resolve().parents[2] / "notebooks"
CELL_TIMEOUT_SEC = 300


def _execute(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> tuple[str, int]:
  """Runs a notebook in a kernel started in tmp_path/run.

  Returns its text outputs, joined, and the number of PNG images it showed.
  """
  # A python3 kernel spec that runs this interpreter, ahead of any other on JUPYTER_PATH: a
  # kernel without adafactor_jax would make the first cell pip-install it from GitHub.
  spec = tmp_path / "jupyter" / "kernels" / "python3"
  spec.mkdir(parents=True)
  argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
  kernel = {"argv": argv, "display_name": "Python 3", "language": "python"}
  (spec / "kernel.json").write_text(json.dumps(kernel))
  monkeypatch.setenv("JUPYTER_PATH", str(tmp_path / "jupyter"))
  # The kernel inherits this environment: the small sizes, temporary workdirs under tmp_path,
  # ipykernel's inline plots, and less XLA optimization (compiling dominates these tiny runs).
  run = tmp_path / "run"
  run.mkdir()
  # One device unless a notebook asks for more (the sharded one does, in its first cell).
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setenv("ADAFACTOR_NOTEBOOK_SMALL", "1")
  monkeypatch.setenv("TMPDIR", str(run))
  monkeypatch.delenv("MPLBACKEND", raising=False)
  monkeypatch.setenv("JAX_DISABLE_MOST_OPTIMIZATIONS", "1")

  nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
  assert all(not cell.get("outputs") for cell in nb.cells), f"{name}: commit it without outputs"
  client = nbclient.NotebookClient(
    nb, timeout=CELL_TIMEOUT_SEC, kernel_name="python3", resources={"metadata": {"path": str(run)}}
  )
  client.execute()  # raises CellExecutionError, with the cell and traceback, on an error
  texts, images = [], 0
  for cell in nb.cells:
    for output in cell.get("outputs", []):
      assert output.output_type != "error", output
      if output.output_type == "stream":
        texts.append(output.text)
      elif "image/png" in output.get("data", {}):
        images += 1
      elif "text/plain" in output.get("data", {}):
        texts.append(output.data["text/plain"])
  return "\n".join(texts), images


def test_quickstart(tmp_path, monkeypatch):
  text, images = _execute("quickstart", tmp_path, monkeypatch)
  assert "statistics: 384 numbers = 256 + 128" in text, text
  assert re.search(r"MLP loss: [\d.]+ at the start, [\d.]+ after 400 steps", text), text
  # The job's own summary, then the notebook's line under the loss.png it displays.
  assert re.search(r"^final eval loss +\d+\.\d{4}$", text, re.MULTILINE), text
  assert re.search(r"final eval loss \d+\.\d{4} nats/byte after 20 steps", text), text
  assert images == 2, text  # the two loss curves, then the job's loss.png
  workdirs = list((tmp_path / "run").glob("adafactor_quickstart_*"))
  assert len(workdirs) == 1 and (workdirs[0] / "summary.json").is_file(), workdirs


def test_paper_findings(tmp_path, monkeypatch):
  text, images = _execute("paper_findings", tmp_path, monkeypatch)
  for row in paper.ROWS:
    assert re.search(rf"^\| {row} \| \d+\.\d{{4}} \|", text, re.MULTILINE), (row, text)
  verdicts = re.findall(r"^\[[123+]\] (reproduced|NOT reproduced) ", text, re.MULTILINE)
  assert len(verdicts) == 10, text
  assert re.search(r"\d+ of 10 claims reproduced after 4 steps\.", text), text
  # The telemetry of beta2 = 0.999 against 1 - t^-0.8: a row of figures for each, early and over
  # the run, then whether the paper's mechanism shows.
  number = r"\d+\.\d{3}"
  for label in ("β2 = 0.999", "1 − t\\^−0\\.8"):
    for steps in ("1-1", "1-4"):
      assert re.search(rf"^\| {label} \| {steps} \|( {number} \|){{5}}$", text, re.M), (label, text)
  verdict = r"^mechanism (seen|NOT seen) \(the paper: .*\): here, steps 1-1, mean max RMS\(U\) "
  assert re.search(verdict, text, re.M), text
  # The fair comparison at the small size: the reference, tuned Adafactor and AdamW, each row's
  # mean and spread over seeds, then a verdict per target (those of rows not run say so).
  for row in ("adafactor_paper", "adafactor", "adamw_b2_0.95"):
    assert re.search(rf"^\| {row} \| [^|]+ \| [^|]+ \| \d+\.\d{{4}} ± \d+\.\d{{4}} \|", text, re.M)
  targets = re.findall(r"^\[(met|NOT met|-)\] ", text, re.MULTILINE)
  assert len(targets) == 4 and targets.count("-") == 2, text
  assert images == 3, text  # the eval-loss panels, the telemetry's, the fair sweep's


def test_sharded(tmp_path, monkeypatch):
  text, images = _execute("sharded", tmp_path, monkeypatch)
  assert re.search(r"^8 devices: ", text, re.MULTILINE), text
  assert re.search(r"^blocks/0/mlp_in/kernel +P\('embed', 'mlp'\)$", text, re.MULTILINE), text
  # The 128x512 kernel is sharded ('data', 'model'); its row statistic over 'data' only and its
  # column statistic over 'model' only: the averaged axis replicated.
  spec = r"P(?:artitionSpec)?"
  assert re.search(rf"kernel: \(128, 512\), sharded {spec}\('data', 'model'\)$", text, re.M), text
  # The job's Adafactor records telemetry by default: its state is inside a TelemetryState.
  state = r"^opt_state/0/(?:inner_state/)?"
  row = rf"{state}v_row/blocks/0/mlp_in/kernel +\(128, 1\) +{spec}\('data',(?: None)?\)$"
  col = rf"{state}v_col/blocks/0/mlp_in/kernel +\(1, 512\) +{spec}\(None, 'model'\)$"
  assert re.search(row, text, re.MULTILINE), text
  assert re.search(col, text, re.MULTILINE), text
  sizes = re.search(r"^optimizer state: ([\d,]+) of ([\d,]+) bytes on one device$", text, re.M)
  here, total = (int(n.replace(",", "")) for n in sizes.groups())
  assert 0 < here < total / 2, text
  assert re.search(r"^state_shardings: \d+ shardings, equal to opt_state's$", text, re.M), text
  collectives = re.search(r"^collectives: Counter\((.*)\)$", text, re.MULTILINE).group(1)
  assert "'all-reduce'" in collectives and "all-gather" not in collectives, text
  # The job on 2 x 4, then resumed on 8 x 1 from the halfway checkpoint, with the same losses.
  assert re.search(r"^mesh \{'data': 2, 'model': 4\} devices 8 processes 1$", text, re.M), text
  assert re.search(r"^resumed at step 2 on mesh \{'data': 8, 'model': 1\}$", text, re.M), text
  rows = re.findall(r"^step +(\d+)  loss 2x4 (\d+\.\d+)  8x1 (\d+\.\d+)$", text, re.MULTILINE)
  assert [int(step) for step, _, _ in rows] == [2, 4], text
  for _, a, b in rows:
    assert abs(float(a) - float(b)) <= 1e-4, text
  assert float(rows[-1][1]) < float(rows[0][1]), text
  assert images == 0, text


def test_paper_findings_quotes_the_verdicts_its_targets_cell_prints_on_the_committed_results(
  capsys,
):
  """The markdown above the targets' cell quotes what that cell prints on the project's
  results (docs/results/fair_default.json, fair_default_3000.json and fair_4x.json): rerun the
  suite, and a quote not brought up to date fails here."""
  nb = nbformat.read(NOTEBOOKS / "paper_findings.ipynb", as_version=4)
  (index,) = [i for i, c in enumerate(nb.cells) if "def check_targets(fair)" in c.source]
  quoted = re.search(r"the next cell prints:\n\n```\n(.*?)\n```", nb.cells[index - 1].source, re.S)
  assert quoted, nb.cells[index - 1].source
  results = NOTEBOOKS.parent / "docs" / "results"
  sizes = {
    "the default job": json.loads((results / "fair_default.json").read_text()),
    "the default job, 3000 steps (four rows)": json.loads(
      (results / "fair_default_3000.json").read_text()
    ),
    "4x the parameters (d_model 256, mlp_dim 1024)": json.loads(
      (results / "fair_4x.json").read_text()
    ),
  }
  exec(nb.cells[index].source, {"SMALL": False, "sizes": sizes, "math": math, "sweep": sweep})
  assert capsys.readouterr().out.strip() == quoted.group(1)
