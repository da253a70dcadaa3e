"""The input pipeline: batches as pure functions of (key, step), the train/eval split."""

from __future__ import annotations

import shutil
from pathlib import Path

import jax
import numpy as np
import pytest

from adafactor_jax.training import input_pipeline


def test_batch_at_is_a_pure_function_of_key_and_step():
  text = (np.arange(5000) % 251).astype(np.uint8)
  key = jax.random.key(0)
  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])

  def batch(k, step):
    return np.asarray(input_pipeline.batch_at(text, k, step, 8, 16, sharding))

  first = batch(key, 3)
  assert first.shape == (8, 17) and first.dtype == np.int32
  assert np.array_equal(first, batch(key, 3))
  assert not np.array_equal(first, batch(key, 4))
  assert not np.array_equal(first, batch(jax.random.key(1), 3))
  for row in first:  # contiguous windows of the text
    assert np.array_equal(row, (row[0] + np.arange(17)) % 251)
  # The windows start where jax.random puts them, on any device: the data stream of a seed.
  starts = jax.random.randint(jax.random.fold_in(key, 3), (8,), 0, 5000 - 17)
  assert np.array_equal(first[:, 0], np.asarray(starts) % 251)
  # The evaluation stack holds batch i at index i.
  stacked = input_pipeline.eval_batches(text, key, 3, 8, 16, sharding)
  assert stacked.shape == (3, 8, 17)
  for i in range(3):
    assert np.array_equal(np.asarray(stacked[i]), batch(key, i))


def _python_files(root: Path, names: range) -> dict[str, bytes]:
  """Writes a .py file per name (in three folders) with a unique body; returns relpath: bytes."""
  files = {}
  for i in names:
    path = root / f"pkg{i % 3}" / f"mod{i}.py"
    path.parent.mkdir(parents=True, exist_ok=True)
    data = f"# module {i}\n".encode() + b"x = 1\n" * (5 + i % 7)
    path.write_bytes(data)
    files[str(path.relative_to(root))] = data
  return files


def _split_of(corpus: input_pipeline.Corpus, files: dict[str, bytes]) -> dict[str, str]:
  train_bytes, eval_bytes = corpus.train.tobytes(), corpus.eval.tobytes()
  split = {}
  for name, data in files.items():
    in_train, in_eval = data in train_bytes, data in eval_bytes
    assert in_train != in_eval, name  # every file in exactly one split
    split[name] = "train" if in_train else "eval"
  return split


def test_train_eval_split_is_by_file_disjoint_and_stable(tmp_path):
  root = tmp_path / "a"
  files = _python_files(root, range(40))
  (root / "notes.txt").write_bytes(b"NOT PYTHON " * 10)
  corpus = input_pipeline.load_corpus(str(root), (".py",), 10**7, eval_fraction=0.3)
  assert corpus.num_files == 40
  assert corpus.train.dtype == corpus.eval.dtype == np.uint8
  split = _split_of(corpus, files)
  assert 0 < list(split.values()).count("eval") < 40
  assert b"NOT PYTHON" not in corpus.train.tobytes() + corpus.eval.tobytes()
  assert len(corpus.train) + len(corpus.eval) < sum(map(len, files.values())) + 40

  again = input_pipeline.load_corpus(str(root), (".py",), 10**7, eval_fraction=0.3)
  assert np.array_equal(again.train, corpus.train) and np.array_equal(again.eval, corpus.eval)

  # Elsewhere, with more files: the split of a file depends only on its relative path.
  moved = tmp_path / "b"
  shutil.copytree(root, moved)
  extra = _python_files(moved, range(40, 80))
  bigger = input_pipeline.load_corpus(str(moved), (".py",), 10**7, eval_fraction=0.3)
  assert bigger.num_files == 80
  bigger_split = _split_of(bigger, {**files, **extra})
  assert {name: bigger_split[name] for name in files} == split


def test_max_bytes_caps_the_corpus(tmp_path):
  files = _python_files(tmp_path, range(40))
  budget = sum(map(len, files.values())) // 3
  corpus = input_pipeline.load_corpus(str(tmp_path), (".py",), budget, eval_fraction=0.3)
  assert 0 < corpus.num_files < 40
  train_bytes, eval_bytes = corpus.train.tobytes(), corpus.eval.tobytes()
  chosen = [data for data in files.values() if data in train_bytes or data in eval_bytes]
  assert len(chosen) == corpus.num_files
  assert sum(map(len, chosen)) <= budget


def test_single_file_is_split_by_fraction(tmp_path):
  data = bytes(range(256)) * 4
  path = tmp_path / "book.txt"
  path.write_bytes(data)
  corpus = input_pipeline.load_corpus(str(path), eval_fraction=0.25)
  assert corpus.num_files == 1
  assert corpus.train.tobytes() + corpus.eval.tobytes() == data
  assert len(corpus.eval) == len(data) // 4
  with pytest.raises(input_pipeline.CorpusError, match="eval split.*book.txt"):
    input_pipeline.load_corpus(str(path), eval_fraction=0.25, min_bytes=300)
