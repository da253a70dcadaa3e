"""benchmarks/memory_tpu.py (``python -m benchmarks.memory --topology``): the train step
compiled by libtpu for one v5e chip, its figures written as compiled, a size too large for
the chip refused with RESOURCE_EXHAUSTED and written as not fitting, and the walk over sizes."""

from __future__ import annotations

import importlib.util
import json

import jax.numpy as jnp
import pytest

from benchmarks import gpt, memory, memory_tpu, readme, tpu

SMALL = gpt.Config(d_model=128, n_layers=2, vocab=512, seq_len=32, batch=2)
# 2 x 2^16 tokens of 2^14-wide logits: 64 GiB of float32 temporaries, over a v5e's 16 GiB.
HUGE = gpt.Config(d_model=128, n_layers=2, vocab=2**14, seq_len=2**16, batch=2)

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason="compiling for a TPU needs libtpu: pip install -e '.[tpu]'",
)


@needs_libtpu
def test_v5e_figures_are_the_compiled_programs_and_too_large_is_refused(tmp_path, monkeypatch):
  monkeypatch.setitem(memory.SIZES, "tiny", SMALL)
  monkeypatch.setitem(memory.SIZES, "huge", HUGE)
  results = memory.main(
    ["--topology", "v5e:2x2", "--sizes", "tiny,huge", "--optimizers", "sgd", "--dtypes"]
    + ["float32", "--out", str(tmp_path)]
  )
  written = json.loads((tmp_path / "memory_tpu.json").read_text())
  chip = written["chips"]["v5e"]
  assert chip["topology"] == "v5e:2x2" and chip["device_kind"] == "TPU v5 lite"
  per_size = chip["peaks"]["float32"]["sgd"]
  compiled = memory.compile_train_step("sgd", SMALL, jnp.float32, tpu.devices("v5e:2x2")[0])
  figures = dict(per_size["tiny"])
  assert figures.pop("compile_s") > 0
  assert figures == memory.peak_bytes(compiled)  # arguments, temporaries, outputs, aliased, peak
  assert figures["temporaries"] == compiled.memory_analysis().temp_size_in_bytes
  assert "RESOURCE_EXHAUSTED" in per_size["huge"]["refused"]
  assert "peak" not in per_size["huge"]
  assert memory_tpu.largest(per_size) == ("tiny", "huge")
  assert written["environment"]["libtpu"] == tpu.libtpu_version()
  assert (tmp_path / "memory_tpu.png").stat().st_size > 0
  table = memory_tpu.readme_table(results)
  assert "| float32 | SGD |" in table and "refused" in table
  assert "15.75G available" in table  # the compiler's own figure, read from its refusal


def test_walk_stops_where_the_sizes_cross_the_budget():
  sizes = ["a", "b", "c", "d", "e"]
  limit = {"a": 1, "b": 2, "c": 3, "d": 4, "e": 5}

  def walked(start: int, fits_up_to: int) -> list[str]:
    compiled = []

    def compile_size(size: str) -> dict:
      compiled.append(size)
      return {"peak": 1} if limit[size] <= fits_up_to else {"refused": "RESOURCE_EXHAUSTED"}

    per_size = memory_tpu.walk(compile_size, sizes, start)
    assert list(per_size) == sorted(compiled)
    return compiled

  monkeypatch = pytest.MonkeyPatch()
  for size, params in limit.items():
    monkeypatch.setitem(memory.SIZES, size, SMALL._replace(n_layers=params))
  try:
    assert walked(1, 3) == ["b", "c", "d"]  # up from b to the first refused
    assert walked(3, 1) == ["d", "c", "b", "a"]  # down from d to the first that fits
    assert walked(0, 0) == ["a"]  # the smallest refused: nothing fits
    assert walked(4, 5) == ["e"]  # the largest fits: nothing larger measured
  finally:
    monkeypatch.undo()


def test_the_readme_renders_the_tpu_table_from_its_json():
  rendered = readme.render("benchmarks/results/memory_tpu.json")
  assert rendered.startswith("Compiled ") and "RESOURCE_EXHAUSTED" in rendered
  written = json.loads(open(readme.ROOT / "benchmarks/results/memory_tpu.json").read())
  assert set(written["chips"]) == {"v5e", "v6e", "v4", "v5p"}
