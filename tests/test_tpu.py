"""The update on the TPU compiler: compiled for TPU topologies ahead of time, no TPU needed.

The figures are the compiled programs' own (``cost_analysis()``, ``memory_analysis()``), and
deterministic for a jax and its libtpu: the ``[tpu]`` extra pins both (pyproject.toml says how
to move the pin). The trees are benchmarks/trees.py's ``large`` and ``large_stacked`` (168M
float32 parameters; the stacked leaves are too large for a core's on-chip memory, so that
bytes accessed are HBM traffic there, while a plain 4096 x 4096 leaf can be prefetched on chip
and its copies counted: ``hbm_bytes_per_param`` counts HBM alone). CI installs
``.[test,tpu]``; without libtpu these tests skip.
"""

from __future__ import annotations

import functools

import pytest

pytest.importorskip("libtpu", reason="compiling for a TPU topology needs libtpu: '.[tpu]'")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import optax  # noqa: E402
from jax.sharding import AxisType, NamedSharding, PartitionSpec  # noqa: E402

import adafactor_jax  # noqa: E402
from benchmarks import run, tpu  # noqa: E402

TREES = ("large", "large_stacked")
OPTIMIZERS = (
  "sgd",
  "optax_adamw",
  "optax_adafactor",
  "optax_adafactor_bf16_momentum",
  "adafactor_jax",
  "adafactor_jax_telemetry",
  "adafactor_jax_bf16_momentum",
  "adafactor_jax_int8_momentum",
  "adafactor_jax_bf16_params",
)


@functools.cache
def compiled_figures(topology: str) -> dict:
  return run.compile_for_topology(topology, TREES, OPTIMIZERS)["trees"]


def bytes_per_param(topology: str, tree: str, optimizer: str) -> float:
  return compiled_figures(topology)[tree]["optimizers"][optimizer]["bytes_per_param"]


def hbm_per_param(topology: str, tree: str, optimizer: str) -> float:
  return compiled_figures(topology)[tree]["optimizers"][optimizer]["hbm_bytes_per_param"]


def test_hbm_bytes_leave_out_the_on_chip_side_of_prefetched_buffers():
  """v5e's compiler prefetches some of SGD's 4096 x 4096 gradients on chip: its bytes
  accessed count the copy's both ends and the on-chip read (17.2 per parameter), its HBM
  traffic is SGD's 12. Where nothing is prefetched (SGD and AdamW on v5p) the counts agree,
  and nowhere does the HBM traffic exceed the bytes accessed."""
  assert hbm_per_param("v5e:2x2", "large", "sgd") == pytest.approx(12.0, abs=0.01)
  assert bytes_per_param("v5e:2x2", "large", "sgd") > 17.0
  for tree in TREES:
    for name in ("sgd", "optax_adamw"):
      accessed = bytes_per_param("v5p:2x2x1", tree, name)
      assert hbm_per_param("v5p:2x2x1", tree, name) == pytest.approx(accessed, rel=1e-4)
  for topology in tpu.TOPOLOGIES:
    for tree in TREES:
      for name in OPTIMIZERS:
        assert hbm_per_param(topology, tree, name) <= bytes_per_param(topology, tree, name)


def test_v5p_time_estimate_is_the_bytes_accessed_over_one_bandwidth():
  """v5p's ``optimal_seconds`` is its bytes accessed over 2.35 TB/s for every program here:
  it counts an on-chip access as an HBM one, and says nothing the bytes do not."""
  v5p = compiled_figures("v5p:2x2x1")
  for tree in TREES:
    for name, f in v5p[tree]["optimizers"].items():
      bandwidth = f["bytes_accessed"] / (f["optimal_ms"] / 1e3)
      assert bandwidth == pytest.approx(2.35e12, rel=1e-3), (tree, name)


def test_v5p_update_is_at_the_floor_of_three_passes():
  """v5p's cost model counts SGD at exactly its 12 bytes per float32 parameter (read G and
  X, write X). Adafactor with clipping and parameter scale reads G and X for the statistics
  and RMS(X), G for RMS(U), then G and X and writes X: 24 (measured 24.05 and 24.06; the
  factored statistics and the bias add the rest), below AdamW's 28."""
  for tree in TREES:
    assert bytes_per_param("v5p:2x2x1", tree, "sgd") == pytest.approx(12.0, abs=0.01)
    assert bytes_per_param("v5p:2x2x1", tree, "optax_adamw") == pytest.approx(28.0, abs=0.01)
    for name in ("adafactor_jax", "adafactor_jax_telemetry"):
      assert 24.0 <= bytes_per_param("v5p:2x2x1", tree, name) < 24.1, (tree, name)


def test_v5p_bf16_momentum_adds_its_four_bytes():
  """The bf16 buffer read and written once more: 28 (measured 28.06) on the stacked tree.
  (On the plain tree each 4096 x 4096 buffer, 32 MiB, is prefetched on chip and its copies
  are counted as well: 34.45, optax.adafactor's bf16 momentum 33.63.)"""
  assert 28.0 <= bytes_per_param("v5p:2x2x1", "large_stacked", "adafactor_jax_bf16_momentum") < 28.1


@pytest.mark.parametrize("topology", tpu.TOPOLOGIES)
def test_int8_momentum_moves_27_bytes_per_parameter_through_hbm(topology):
  """adafactor's int8 momentum, a block per line along the longest axis, its grid the chord
  bound (adafactor_jax.momentum.chord_bound): the line maxima come from the pass that
  computes the clipping denominator, so the step reads G and X for the statistics and RMS(X),
  G and the int8 values for the clipping denominator and the line bounds, then G, the int8
  values and X and writes both: 8 + 5 + 14 = 27 bytes per parameter through HBM, on every
  chip and tree (measured 26.2 to 27.02; with each line's exact maximum, a pass of its own,
  32.6 to 33.0, 26.4 and 24.2 on v4's and v6e's plain tree). Bytes accessed, which add the
  on-chip side of prefetched buffers: 28.5-28.7 on the stacked tree (before, 33.4-34.0),
  37.5-42.2 on the plain one (34.5-47.7). No temporary array is larger than a factored
  statistic (the embedding's 32768 row means): the int8 values are never copied (v4's
  compiler copied the embedding's, 5.7% of the parameters' bytes)."""
  figures = compiled_figures(topology)
  for tree in TREES:
    int8 = figures[tree]["optimizers"]["adafactor_jax_int8_momentum"]
    assert int8["hbm_bytes_per_param"] < 27.05, tree
    assert int8["bytes_per_param"] < (42.3 if tree == "large" else 28.7), tree
    assert int8["largest_temp"]["bytes"] <= 32768 * 4, (tree, int8["largest_temp"])
  stacked = figures["large_stacked"]["optimizers"]["adafactor_jax_int8_momentum"]
  assert stacked["temp_pct_of_params"] < 0.3


@pytest.mark.parametrize("topology", tpu.TOPOLOGIES)
def test_no_more_traffic_than_optax_adafactor_and_no_temporaries(topology):
  """On every chip and tree, the default update moves no more bytes than optax.adafactor's in
  the same compile (v5e 28.85 against 29.23, v4 37.63 against 38.04, ...) and no more than
  AdamW's where the stacked leaves let the compiler reach the floor; its temporaries stay
  under 1% of the parameters' bytes, and no temporary array is larger than a factored
  statistic (the embedding's 32768 row means, 128 KiB): nothing parameter-sized is stored.
  v6e's 1.4% on the plain tree (optax.adafactor's 1.3%) is 284 small values, the handles of
  the compiler's sliced prefetches of its leaves, each at its own 16 KiB aligned offset
  (the next test turns them off)."""
  figures = compiled_figures(topology)
  for tree in TREES:
    ours = figures[tree]["optimizers"]["adafactor_jax"]
    assert ours["bytes_per_param"] <= bytes_per_param(topology, tree, "optax_adafactor"), tree
    for name in ("adafactor_jax", "adafactor_jax_telemetry", "adafactor_jax_bf16_momentum"):
      figure = figures[tree]["optimizers"][name]
      assert figure["largest_temp"] is None or figure["largest_temp"]["bytes"] <= 32768 * 4, (
        tree,
        name,
        figure["largest_temp"],
      )
      limit = 1.5 if (topology, tree) == ("v6e:2x2", "large") else 1.0
      assert figure["temp_pct_of_params"] < limit, (tree, name)
  stacked = bytes_per_param(topology, "large_stacked", "adafactor_jax")
  assert stacked <= bytes_per_param(topology, "large_stacked", "optax_adamw")


SLICED_PREFETCH_OFF = {"xla_tpu_sliced_prefetch_max_slices": 0}


ABOVE_ONE_PERCENT = {
  "v5e:2x2": ("adafactor_jax_int8_momentum", "adafactor_jax_bf16_params"),
  "v4:2x2x1": ("adafactor_jax_bf16_params",),
  "v6e:2x2": (
    "adafactor_jax",
    "adafactor_jax_bf16_momentum",
    "adafactor_jax_int8_momentum",
    "adafactor_jax_bf16_params",
  ),
}


@pytest.mark.parametrize("topology", sorted(ABOVE_ONE_PERCENT))
def test_temporaries_above_one_percent_are_the_compilers_sliced_prefetches(topology):
  """Where the plain tree's temporaries pass 1% of the parameters' bytes (v6e: the default
  1.4%, bf16 momentum 1.3%, int8 2.0%, bfloat16 parameters 3.6%; v5e: int8 1.2%, bfloat16
  parameters 1.7%; v4: bfloat16 parameters 1.7%), they are the handles of the compiler's
  sliced prefetches, each at its own 16 KiB-aligned offset: compiled with sliced prefetch
  off, every one is under 1% (v6e 0.49%, 0.57%, 0.96%, 0.97%; v5e 0.77%, 0.61%; v4 0.63%)
  and moves the same HBM bytes within 0.25 per parameter (only the on-chip side, in bytes
  accessed, grows)."""
  names = ABOVE_ONE_PERCENT[topology]
  unsliced = run.compile_for_topology(
    topology, ("large",), names, compiler_options=SLICED_PREFETCH_OFF
  )["trees"]["large"]["optimizers"]
  for name in names:
    before, after = compiled_figures(topology)["large"]["optimizers"][name], unsliced[name]
    assert before["temp_pct_of_params"] > 1.0, name
    assert after["temp_pct_of_params"] < 1.0, name
    assert after["hbm_bytes_per_param"] == pytest.approx(before["hbm_bytes_per_param"], abs=0.25)


def test_update_and_apply_in_groups_on_trees_of_many_small_leaves():
  """GPT-2's and T5-small's trees (an embedding beside many 768- and 512-wide leaves) on v5p:
  the plain step interleaves the leaves' passes and the compiler copies their buffers on and
  off chip (bytes accessed: GPT-2 63.4 per parameter, T5-small 73.9; through HBM 22.0 and
  20.7); in three groups, 40.3 and 47.6 accessed, 19.2 and 16.8 through HBM, T5-small's below
  optax.adafactor's by both counts (52.2 and 19.2). What groups do on other chips is in
  docs/tpu.md: not everywhere a gain."""
  figures = run.compile_for_topology(
    "v5p:2x2x1", ("gpt2_124m",), ("adafactor_jax", "adafactor_jax_in_groups")
  )["trees"]["gpt2_124m"]["optimizers"]
  plain, grouped = figures["adafactor_jax"], figures["adafactor_jax_in_groups"]
  assert grouped["bytes_per_param"] < 0.7 * plain["bytes_per_param"]
  assert grouped["hbm_bytes_per_param"] < 0.9 * plain["hbm_bytes_per_param"]
  assert grouped["temp_pct_of_params"] < 0.1
  t5 = run.compile_for_topology(
    "v5p:2x2x1", ("t5_small",), ("adafactor_jax_in_groups", "optax_adafactor")
  )["trees"]["t5_small"]["optimizers"]
  grouped, optax_adafactor = t5["adafactor_jax_in_groups"], t5["optax_adafactor"]
  assert grouped["bytes_per_param"] < optax_adafactor["bytes_per_param"]
  assert grouped["hbm_bytes_per_param"] < 0.9 * optax_adafactor["hbm_bytes_per_param"]


def test_an_unknown_topology_is_refused_with_one_line():
  with pytest.raises(tpu.TopologyError, match=r"^--topology v9:2x2: not a TPU topology") as info:
    tpu.devices("v9:2x2")
  assert "\n" not in str(info.value)


@pytest.mark.parametrize(
  "tx", [optax.adamw(1e-3), adafactor_jax.adafactor(learning_rate=1e-2, momentum=0.9)]
)
def test_state_shardings_stay_on_a_topologys_mesh(tx):
  # The step count depends on no parameter: jit alone would put it on the default device (the
  # CPU), and a step compiled for the topology would then refuse the state.
  mesh = jax.make_mesh((4,), ("data",), axis_types=(AxisType.Auto,), devices=tpu.devices("v5e:2x2"))
  params = {"w": jax.ShapeDtypeStruct((256, 512), jnp.float32), "b": jnp.zeros((512,))}
  param_shardings = {
    "w": NamedSharding(mesh, PartitionSpec("data", None)),
    "b": NamedSharding(mesh, PartitionSpec()),
  }
  shardings = adafactor_jax.state_shardings(tx, params=params, param_shardings=param_shardings)
  devices = set(mesh.devices.flat)
  assert all(s.device_set == devices for s in jax.tree.leaves(shardings))
  # optax's moments are zeros_like the parameters, which jit alone would replicate: they are
  # sharded as their parameter (the library's own buffers already were).
  moments = [s for s in jax.tree.leaves(shardings) if not s.is_fully_replicated]
  assert moments and all(s.spec[0] == "data" for s in moments)
  state = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
    jax.eval_shape(tx.init, params),
    shardings,
  )
  placed = jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, param_shardings
  )
  grads = placed
  jax.jit(tx.update).lower(grads, state, placed).compile()  # on the topology's devices only


def test_a_step_that_also_returns_a_scalar_is_scheduled_otherwise_on_many_small_leaves():
  """The update alone returns only donated buffers; a train step returns its loss too. With
  one scalar out beside them, the TPU compiler schedules GPT-2's plain update on v5p leaf by
  leaf: 32.6 bytes accessed per parameter (63.4 without the scalar), below optax.adafactor's
  35.9 in the same program, and 19.9 through HBM (22.0 without), below its 26.1, with no
  temporaries. The bytes accessed of small-leaf trees are the compiler's schedule: AdamW's go
  the other way there (39.6 to 55.6), its HBM bytes stay at 28. On T5-small the plain update
  counts more bytes accessed than optax.adafactor's (59.1 against 52.2) and moves less
  through HBM (15.4 against 19.2)."""
  compiled = run.compile_for_topology(
    "v5p:2x2x1", ("gpt2_124m", "t5_small"), ("adafactor_jax", "optax_adafactor"), scalar_out=True
  )["trees"]
  figures = compiled["gpt2_124m"]["optimizers"]
  ours, optax_adafactor = figures["adafactor_jax"], figures["optax_adafactor"]
  assert ours["bytes_per_param"] < 0.95 * optax_adafactor["bytes_per_param"]
  assert ours["hbm_bytes_per_param"] < 0.8 * optax_adafactor["hbm_bytes_per_param"]
  assert ours["bytes_per_param"] < 34.0
  assert ours["temp_pct_of_params"] < 0.1
  t5 = compiled["t5_small"]["optimizers"]
  assert (
    t5["adafactor_jax"]["hbm_bytes_per_param"] < 0.85 * t5["optax_adafactor"]["hbm_bytes_per_param"]
  )
