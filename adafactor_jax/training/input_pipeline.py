"""Byte-level language-modelling data read from text files on disk.

The default corpus is the Python standard library's own source code, which is
on every machine that runs Python: nothing is downloaded. Files are split into
train and eval by a hash of their relative path, so the split does not depend
on which other files a machine has. A batch is a pure function of
``(seed, step)``: a resumed run sees exactly the data an uninterrupted one would.
"""

from __future__ import annotations

import functools
import hashlib
import os
import sysconfig
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np

VOCAB_SIZE = 256  # bytes


class CorpusError(ValueError):
  """The corpus is missing, unreadable, or too small for the configured windows."""


def default_corpus() -> str:
  """The directory of the running Python's standard library."""
  return sysconfig.get_paths()["stdlib"]


def _is_eval(relative_path: str, eval_fraction: float) -> bool:
  digest = hashlib.sha256(relative_path.encode()).digest()
  return int.from_bytes(digest[:8], "little") < eval_fraction * 2.0**64


def _text_files(corpus: str, suffixes: tuple[str, ...], max_bytes: int) -> list[tuple[str, str]]:
  """(relative path, absolute path) of the corpus' text files, sorted, up to max_bytes."""
  if os.path.isfile(corpus):
    return [(os.path.basename(corpus), corpus)]
  found: list[str] = []
  for root, dirs, files in os.walk(corpus):
    dirs[:] = sorted(d for d in dirs if d not in ("site-packages", "dist-packages", "__pycache__"))
    found.extend(os.path.join(root, f) for f in sorted(files) if f.endswith(suffixes))
  chosen, total = [], 0
  for path in found:
    size = os.path.getsize(path)
    if total + size > max_bytes:
      continue
    chosen.append((os.path.relpath(path, corpus), path))
    total += size
  return chosen


@dataclass(frozen=True)
class Corpus:
  """Train and eval text as flat uint8 arrays of bytes."""

  train: np.ndarray
  eval: np.ndarray
  num_files: int


def load_corpus(
  corpus: str = "",
  suffixes: tuple[str, ...] = (".py",),
  max_bytes: int = 16_000_000,
  eval_fraction: float = 0.05,
  min_bytes: int = 0,
) -> Corpus:
  """Reads the corpus (a directory of text files, or one file) into memory.

  Args:
    corpus: a directory or a file; "" means the Python standard library.
    suffixes: file name endings to read from a directory.
    max_bytes: stop adding files past this many bytes (files in sorted order).
    eval_fraction: share of files (by path hash) held out for evaluation. A
      single file is split at that fraction of its length instead.
    min_bytes: each split must hold at least this many bytes.

  Raises:
    CorpusError: naming the path, if it is missing, unreadable or too small.
  """
  path = corpus or default_corpus()
  if not os.path.exists(path):
    raise CorpusError(f"data.corpus: {path!r} does not exist.")
  files = _text_files(path, suffixes, max_bytes)
  if not files:
    raise CorpusError(f"data.corpus: no files ending in {suffixes} under {path!r}.")
  train: list[bytes] = []
  held_out: list[bytes] = []
  for relative, absolute in files:
    try:
      with open(absolute, "rb") as f:
        data = f.read()
    except OSError as e:
      raise CorpusError(f"data.corpus: cannot read {absolute!r}: {e.strerror}.") from e
    (held_out if _is_eval(relative, eval_fraction) else train).append(data)
  if len(files) == 1:
    data = (train + held_out)[0]
    cut = int(len(data) * (1 - eval_fraction))
    train, held_out = [data[:cut]], [data[cut:]]
  splits = {"train": b"\n".join(train), "eval": b"\n".join(held_out)}
  for name, text in splits.items():
    if len(text) < min_bytes:
      raise CorpusError(
        f"data.corpus: the {name} split of {path!r} has {len(text)} bytes; "
        f"at least {min_bytes} are needed for one window of data.seq_len + 1 bytes."
      )
  return Corpus(
    train=np.frombuffer(splits["train"], np.uint8),
    eval=np.frombuffer(splits["eval"], np.uint8),
    num_files=len(files),
  )


def window_starts(
  key: jax.Array, step: int, batch_size: int, seq_len: int, text_len: int
) -> np.ndarray:
  """Where the ``batch_size`` windows of ``seq_len + 1`` bytes of ``step`` start.

  A pure function of ``(key, step)``, computed on the host's CPU device (it is
  a few integers; an accelerator stays busy with the train step), the same on
  every process.
  """
  cpu = jax.local_devices(backend="cpu")[0]
  high = text_len - seq_len - 1
  return np.asarray(_window_starts(jax.device_put(key, cpu), step, batch_size, high))


@functools.partial(jax.jit, static_argnums=(2, 3))
def _window_starts(key: jax.Array, step: int, batch_size: int, high: int) -> jax.Array:
  return jax.random.randint(jax.random.fold_in(key, step), (batch_size,), 0, high)


def windows(text: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
  """The int32 windows ``text[s : s + seq_len + 1]`` for each start ``s``."""
  return text[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def batch_at(
  text: np.ndarray,
  key: jax.Array,
  step: int,
  batch_size: int,
  seq_len: int,
  sharding: jax.sharding.Sharding,
) -> jax.Array:
  """The batch of ``step``: ``batch_size`` random windows of ``seq_len + 1`` bytes.

  A global array with ``sharding``, of which each process builds only the rows
  its own devices hold (multi-host input): the rows do not depend on the mesh.
  """
  starts = window_starts(key, step, batch_size, seq_len, len(text))

  def rows(index: Any) -> np.ndarray:  # the rows a device holds: index[0] is their slice
    return windows(text, starts[index[0]], seq_len)

  return jax.make_array_from_callback((batch_size, seq_len + 1), sharding, rows)


def eval_batches(
  text: np.ndarray,
  key: jax.Array,
  num_batches: int,
  batch_size: int,
  seq_len: int,
  sharding: jax.sharding.Sharding,
) -> jax.Array:
  """The ``num_batches`` evaluation batches, stacked: (num_batches, batch_size, seq_len + 1).

  ``sharding`` shards the stack's second axis (the batch rows).
  """
  starts = np.stack(
    [window_starts(key, i, batch_size, seq_len, len(text)) for i in range(num_batches)]
  )

  def rows(index: Any) -> np.ndarray:  # batches index[0], rows index[1], every byte
    chosen = starts[index[:2]]
    return windows(text, chosen.reshape(-1), seq_len).reshape(chosen.shape + (seq_len + 1,))

  return jax.make_array_from_callback((num_batches, batch_size, seq_len + 1), sharding, rows)
