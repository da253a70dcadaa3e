"""The benchmark suite: tree sizes, the compiled step's memory and state, and a smoke run."""

from __future__ import annotations

import functools
import json
import math

import jax
import jax.numpy as jnp
import pytest

import adafactor_jax
from benchmarks import run, trees

KNOWN_PARAMS = {  # Published counts (HF t5-small, GPT-2 small, ViT-B/16 with a 1000-class head).
  "t5_small": 60_506_624,
  "gpt2_124m": 124_439_808,
  "vit_b16": 86_567_656,
  "stacked": 124_439_808,
}


@pytest.mark.parametrize("name", list(KNOWN_PARAMS))
def test_tree_sizes(name):
  shapes = trees.TREES[name]()
  count = trees.param_count(shapes)
  assert count == pytest.approx(KNOWN_PARAMS[name], rel=0.02)
  assert trees.tree_bytes(shapes) == 4 * count
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(shapes))


def test_tree_shapes():
  t5, gpt2, vit, stacked = (trees.TREES[n]() for n in KNOWN_PARAMS)
  assert t5["shared"]["embedding"].shape == (32128, 512)
  assert t5["encoder"]["relative_attention_bias"]["embedding"].shape == (32, 8)
  assert t5["decoder"]["block_5"]["cross_attention"]["o"]["kernel"].shape == (512, 512)
  assert t5["encoder"]["block_0"]["mlp"]["wi"]["kernel"].shape == (512, 2048)
  assert "cross_attention" not in t5["encoder"]["block_0"]
  assert gpt2["wte"]["embedding"].shape == (50257, 768)
  assert gpt2["h"]["11"]["attn"]["c_attn"]["kernel"].shape == (768, 2304)
  assert vit["embedding"]["kernel"].shape == (16, 16, 3, 768)
  assert vit["Transformer"]["posembed_input"]["pos_embedding"].shape == (1, 197, 768)
  attention = vit["Transformer"]["encoderblock_0"]["MultiHeadDotProductAttention_1"]
  assert attention["query"]["kernel"].shape == (768, 12, 64)
  assert attention["out"]["kernel"].shape == (12, 64, 768)
  assert stacked["h"]["mlp"]["c_fc"]["kernel"].shape == (12, 768, 3072)
  assert stacked["h"]["ln_1"]["scale"].shape == (12, 768)


def test_sweep_spans_1m_to_500m():
  counts = [trees.param_count(trees.sweep_tree(*dims)) for dims in trees.SWEEP]
  assert counts == sorted(counts)
  assert 0.5e6 <= counts[0] <= 2e6
  assert 400e6 <= counts[-1] <= 520e6


def factored_bytes(shape: tuple[int, ...], min_dim: int = 128) -> int:
  """Bytes of Adafactor's float32 statistics for one parameter, by the default rule.

  Factored (rank >= 2, second largest dim >= min_dim): a row and a column statistic
  over the two largest dims (ties to the later axis), every other axis a batch axis.
  """
  n = math.prod(shape)
  if len(shape) >= 2:
    *_, row, col = sorted(range(len(shape)), key=lambda i: (shape[i], i))
    if shape[row] >= min_dim:
      return 4 * (n // shape[col] + n // shape[row])
  return 4 * n


def state_overhead(shapes) -> int:
  """Bytes of adafactor_jax.adafactor(1e-2)'s state beyond the statistics (no allocation)."""
  state = jax.eval_shape(adafactor_jax.adafactor(1e-2).init, shapes)
  expected = sum(factored_bytes(x.shape) for x in jax.tree.leaves(shapes))
  return trees.tree_bytes(state) - expected


@pytest.mark.parametrize("name", list(KNOWN_PARAMS))
def test_state_is_the_factored_statistics(name):
  assert 0 <= state_overhead(trees.TREES[name]()) <= 64


def test_state_overhead_does_not_grow_with_leaves():
  def tree(n):
    return {f"w{i}": jax.ShapeDtypeStruct((256, 192), jnp.float32) for i in range(n)} | {
      f"b{i}": jax.ShapeDtypeStruct((192,), jnp.float32) for i in range(n)
    }

  assert state_overhead(tree(5)) == state_overhead(tree(50))


@functools.cache
def adafactor_temp_bytes(name: str, telemetry: bool = False) -> int | None:
  """XLA's temporary bytes of adafactor_jax.adafactor(1e-2)'s step on a tree (compiled once)."""
  tx = adafactor_jax.adafactor(1e-2, telemetry=telemetry)
  return run.temp_bytes(run.compile_step(tx, trees.TREES[name]()))


@pytest.mark.parametrize("name", list(KNOWN_PARAMS))
def test_temp_bytes_at_most_2_percent_of_params(name):
  shapes = trees.TREES[name]()
  temp = adafactor_temp_bytes(name)
  if temp is None:
    pytest.skip("this backend has no memory analysis")
  assert temp <= 0.02 * trees.tree_bytes(shapes), f"{temp / trees.tree_bytes(shapes):.1%}"


@pytest.mark.parametrize("name", ["t5_small", "gpt2_124m"])
def test_telemetry_adds_scalar_temporaries_at_most_and_three_scalars_of_state_per_parameter(name):
  """Its figures are values the step computes anyway; each is stored as one float32."""
  shapes = trees.TREES[name]()
  off, on = adafactor_temp_bytes(name), adafactor_temp_bytes(name, telemetry=True)
  if off is None:
    pytest.skip("this backend has no memory analysis")
  # Packing the figures into one vector each keeps a few of the scalars they are made of
  # (measured: +1.9 KB on T5-small, +0.3 KB on GPT-2, of 2 MB): at most one buffer of
  # XLA:CPU's 64-byte alignment per parameter, nothing near an array's size.
  assert on - off <= 64 * len(jax.tree.leaves(shapes)), (on, off)
  states = [
    jax.eval_shape(adafactor_jax.adafactor(1e-2, telemetry=t).init, shapes) for t in (False, True)
  ]
  # RMS(U), clipping denominator and parameter scale per parameter; beta2 and step size.
  growth = 4 * (3 * len(jax.tree.leaves(shapes)) + 2)
  assert trees.tree_bytes(states[1]) - trees.tree_bytes(states[0]) == growth


def check_figures(figures: dict, n_params: int) -> None:
  """Every column of one optimizer's row is there (all references were measured)."""
  assert figures["median_ms"] > 0
  assert figures["ms_per_mparam"] == pytest.approx(figures["median_ms"] / (n_params / 1e6))
  for column in run.RATIOS:
    assert figures[column] > 0, column
  assert figures["state_bytes"] >= 0
  assert len(figures["times_ms"]) >= 1


def test_smoke_run_writes_every_column(tmp_path, capsys):
  run.main(
    ["--trees", "tiny", "--no-sweep", "--rounds", "1", "--steps-per-round", "2"]
    + ["--out", str(tmp_path)]
  )
  results = json.loads((tmp_path / "results.json").read_text())
  assert (tmp_path / "benchmark.png").stat().st_size > 0
  assert "### tiny" in capsys.readouterr().out
  for key in ("date", "device_kind", "platform", "cpu", "jax", "optax"):
    assert results["environment"][key]
  tiny = results["trees"]["tiny"]
  assert tiny["params"] == trees.param_count(trees.EXTRA_TREES["tiny"]())
  columns = list(run.OPTIMIZERS) + ([run.TORCH] if run.torch_note() is None else [])
  assert list(tiny["optimizers"]) == columns
  if run.torch_note() is not None:
    assert run.torch_note() in results["notes"]
  for name, figures in tiny["optimizers"].items():
    check_figures(figures, tiny["params"])
    if name != run.TORCH:
      assert figures["temp_bytes"] >= 0
      assert figures["temp_pct_of_params"] == pytest.approx(
        100 * figures["temp_bytes"] / tiny["param_bytes"]
      )
  assert tiny["optimizers"]["sgd"]["x_sgd"] == 1.0
  assert tiny["optimizers"]["sgd"]["state_bytes"] == 0
  shapes = trees.EXTRA_TREES["tiny"]()
  state = jax.eval_shape(adafactor_jax.adafactor(1e-2).init, shapes)
  assert tiny["optimizers"]["adafactor_jax"]["state_bytes"] == trees.tree_bytes(state)


def test_smoke_sweep(tmp_path, capsys):
  results = run.main(
    ["--trees", "tiny", "--optimizers", "adafactor_jax,sgd", "--sweep-max-params", "2e6"]
    + ["--rounds", "1", "--sweep-rounds", "1", "--steps-per-round", "1", "--out", str(tmp_path)]
  )
  assert "### scaling sweep" in capsys.readouterr().out
  (entry,) = results["sweep"]
  assert entry["params"] <= 2e6
  assert list(entry["optimizers"]) == ["adafactor_jax", "sgd"]
  for figures in entry["optimizers"].values():
    assert figures["ms_per_mparam"] > 0
  assert any("--sweep-max-params" in note for note in results["notes"])
  assert (
    json.loads((tmp_path / "results.json").read_text())["sweep"][0]["params"] == entry["params"]
  )
  assert (tmp_path / "benchmark.png").stat().st_size > 0


def test_unknown_names_are_refused(tmp_path):
  with pytest.raises(SystemExit):
    run.main(["--trees", "gpt3", "--out", str(tmp_path)])
  with pytest.raises(SystemExit):
    run.main(["--optimizers", "lion", "--out", str(tmp_path)])


def test_scalar_out_is_refused_without_a_topology(tmp_path, capsys):
  with pytest.raises(SystemExit):
    run.main(["--scalar-out", "--out", str(tmp_path)])
  assert "--scalar-out: only with --topology" in capsys.readouterr().err
  assert not list(tmp_path.iterdir())


# A TPU program's entry as the compiler prints it (tiles and attributes trimmed): the
# gradient of w, g, is prefetched on chip (S(1)), the update runs there and is evicted
# to HBM; the gradient of e, h, is prefetched in two halves. 1024 float32 are 4 KiB.
PREFETCHING_PROGRAM = """
HloModule step

%fused (a: f32[1024], b: f32[1024]) -> f32[1024] {
  %a = f32[1024]{0} parameter(0)
  ROOT %s = f32[1024]{0} subtract(%a, %a)
}

ENTRY %main (w: f32[1024], g: f32[1024], e: f32[2048], h: f32[2048]) -> (f32[1024], f32[2048]) {
  %w = f32[1024]{0} parameter(0), sharding={replicated}
  %g = f32[1024]{0} parameter(1), sharding={replicated}
  %e = f32[2048]{0} parameter(2), sharding={replicated}
  %h = f32[2048]{0} parameter(3), sharding={replicated}
  %copy-start = (f32[1024]{0:S(1)}, f32[1024]{0}, u32[]{:S(2)}) copy-start(%g)
  %copy-done = f32[1024]{0:S(1)} copy-done(%copy-start)
  %fusion = f32[1024]{0:S(1)} fusion(%w, %copy-done), kind=kLoop, calls=%fused
  %copy-start.1 = (f32[1024]{0}, f32[1024]{0:S(1)}, u32[]{:S(2)}) copy-start(%fusion)
  %copy-done.1 = f32[1024]{0} copy-done(%copy-start.1)
  %slice-start = ((f32[2048]{0}), f32[1024]{0:S(1)}, s32[]{:S(2)}) slice-start(%h)
  %slice-start.1 = ((f32[2048]{0}), f32[1024]{0:S(1)}, s32[]{:S(2)}) slice-start(%h)
  %slice-done = f32[1024]{0:S(1)} slice-done(%slice-start)
  %slice-done.1 = f32[1024]{0:S(1)} slice-done(%slice-start.1)
  %custom-call = f32[2048]{0:S(1)} custom-call(%slice-done, %slice-done.1)
  %fusion.1 = f32[2048]{0} fusion(%e, %custom-call), kind=kLoop, calls=%fused
  ROOT %tuple = (f32[1024]{0}, f32[2048]{0}) tuple(%copy-done.1, %fusion.1)
}
"""


def test_hbm_bytes_count_each_prefetch_and_eviction_once_and_no_on_chip_access():
  from benchmarks import tpu

  kib = 1024 * 4
  prefetch_g, read_w, evict_update, halves_of_h, read_and_write_e = kib, kib, kib, 2 * kib, 4 * kib
  assert tpu.hbm_bytes(PREFETCHING_PROGRAM) == (
    prefetch_g + read_w + evict_update + halves_of_h + read_and_write_e
  )
  looped = PREFETCHING_PROGRAM.replace("custom-call(", "while(")
  with pytest.raises(ValueError, match="'while'"):
    tpu.hbm_bytes(looped)
  gathered = PREFETCHING_PROGRAM.replace("slice-start(%h)", "all-gather-start(%h)")
  with pytest.raises(ValueError, match="all-gather-start"):
    tpu.hbm_bytes(gathered)


BUFFER_ASSIGNMENT = """\
allocation 0: size 16384, parameter 0, shape |f32[64,64]| at ShapeIndex {}:
 value: <1 p0 @0> (size=16384,offset=0): f32[64,64]{1,0}
allocation 1: size 49184, preallocated-temp:
 value: <2 copy-start.1{} @0> (size=32,offset=49152): (f32[64]{0}, f32[64]{0:S(1)}, u32[]{:S(2)})
 value: <3 multiply.2 @0> (size=16384,offset=0): f32[64,64]{1,0:T(8,128)}
 value: <4 add.3 @0> (size=16384,offset=0): f32[64,64]{1,0:T(8,128)}
 value: <5 fusion.4 @0> (size=32768,offset=16384): f32[128,64]{1,0:T(8,128)}
allocation 2: size 1048576, color 1, preallocated-temp:
 value: <6 copy-done.5 @1> (size=1048576,offset=0): f32[512,512]{1,0:S(1)}
"""

DUMPED_PROGRAM = """\
ENTRY %main (p0: f32[64,64]) -> f32[64,64] {
  %multiply.2 = f32[64,64]{1,0} multiply(%p0, %p0), metadata={op_name="jit(step)/mul"}
  %fusion.4 = f32[128,64]{1,0} fusion(%p0), kind=kLoop, metadata={op_name="jit(step)/concatenate"}
}
"""


def test_largest_buffers_are_the_default_memorys_temporaries_one_per_offset(tmp_path):
  """The parser of XLA's buffer assignment that the TPU figures and --compile_only use: values
  at one offset are one buffer (the largest stands for it), on-chip colours and parameters are
  not temporaries, and each buffer is named by its JAX operation."""
  from adafactor_jax._topology import largest_buffers

  stem = tmp_path / "module_0001.jit_step.after_optimizations"
  (tmp_path / f"{stem.name}-buffer-assignment.txt").write_text(BUFFER_ASSIGNMENT)
  (tmp_path / f"{stem.name}.txt").write_text(DUMPED_PROGRAM)
  assert largest_buffers(str(tmp_path)) == [
    {"bytes": 32768, "shape": "f32[128,64]", "op": "concatenate"},
    {"bytes": 16384, "shape": "f32[64,64]", "op": "mul"},
    {"bytes": 32, "shape": "(f32[64]", "op": "copy-start.1"},
  ]
  assert largest_buffers(str(tmp_path), 1)[0]["bytes"] == 32768
  assert largest_buffers(str(tmp_path / "empty")) == []
