"""Data parallelism over processes: each process's share, gathers, broadcasts.

Evaluation runs on every process at once: each decodes its share of a split
(`share`: every `count`-th example from its own index, round-robin), the
records are gathered once (`gather_objects`) and put back in the split's
order (`interleave`), process 0 scores them, and the scores go back to every
process (`broadcast_object`). Records are picklable Python objects; they
travel as uint8 arrays through `jax.experimental.multihost_utils`, whose
collectives work wherever the run's do (gloo on CPU).

With one process nothing is pickled or sent: the functions return their
input, so a single-process run does exactly what it did without them.
"""

import itertools
import pickle
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import jax
from jax.experimental import multihost_utils
import numpy as np

T = TypeVar("T")


def is_first_process() -> bool:
  """Whether this is process 0: the one that scores, logs and writes files."""
  return jax.process_index() == 0


def process(process_index: int | None = None,
            process_count: int | None = None) -> tuple[int, int]:
  """(this process, processes), defaulting to JAX's.

  Raises:
    ValueError: `process_index` is not in [0, `process_count`).
  """
  index = jax.process_index() if process_index is None else process_index
  count = jax.process_count() if process_count is None else process_count
  if count < 1 or not 0 <= index < count:
    raise ValueError(f"Process {index} of {count} does not exist.")
  return index, count


def share(items: Iterable[T], process_index: int | None = None,
          process_count: int | None = None) -> Iterator[T]:
  """This process's share of a stream: items i with i % count == index.

  Round-robin, so the shares differ in length by one at most, and
  `interleave` of all the shares, in process order, is the stream again.
  Cap the stream (`num_eval_examples`) before sharing it, so the union of
  the shares is what one process would read. `tf.data.Dataset.shard(count,
  index)` takes the same items.

  Args:
    items: the whole stream, in the same order on every process.
    process_index: this process (default: `jax.process_index()`).
    process_count: processes (default: `jax.process_count()`).

  Returns:
    The items of this process, in stream order.
  """
  index, count = process(process_index, process_count)
  return itertools.islice(items, index, None, count)


def interleave(shares: Sequence[Sequence[T]]) -> list[T]:
  """The stream whose `share`s, process by process, are `shares`.

  Args:
    shares: every process's share, in process order.

  Returns:
    Item 0 of process 0, item 0 of process 1, ..., item 1 of process 0, ...
  """
  stream = []
  for k in range(max((len(s) for s in shares), default=0)):
    stream.extend(s[k] for s in shares if k < len(s))
  return stream


def _to_bytes(value: Any) -> np.ndarray:
  return np.frombuffer(pickle.dumps(value, protocol=pickle.HIGHEST_PROTOCOL),
                       dtype=np.uint8)  # [n]


def _from_bytes(data: np.ndarray) -> Any:
  return pickle.loads(np.asarray(data, dtype=np.uint8).tobytes())


def gather_objects(value: Any) -> list[Any]:
  """Every process's `value`, in process order, on every process.

  A collective: every process must call it, the same number of times. The
  values are pickled, padded to the longest and gathered with
  `multihost_utils.process_allgather`, so every process receives them all;
  a process that only needs them on process 0 drops them elsewhere.

  Args:
    value: a picklable object (numpy arrays, lists, dicts, dataclasses).

  Returns:
    [value of process 0, value of process 1, ...].
  """
  if jax.process_count() == 1:
    return [value]
  data = _to_bytes(value)
  lengths = multihost_utils.process_allgather(
      np.asarray(len(data), np.int32))  # [processes]
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:len(data)] = data
  gathered = multihost_utils.process_allgather(padded)  # [processes, n]
  return [_from_bytes(row[:n]) for row, n in zip(gathered, lengths)]


def broadcast_object(value: Any) -> Any:
  """Process 0's `value`, on every process.

  A collective: every process must call it; the others' `value` is ignored
  (pass None).

  Args:
    value: a picklable object, on process 0.

  Returns:
    Process 0's `value` (a copy elsewhere; the object itself on process 0).
  """
  if jax.process_count() == 1:
    return value
  first = is_first_process()
  data = _to_bytes(value) if first else np.zeros(0, np.uint8)
  length = int(multihost_utils.broadcast_one_to_all(
      np.asarray(len(data), np.int32)))
  if not first:
    data = np.zeros(length, np.uint8)
  data = multihost_utils.broadcast_one_to_all(data)
  return value if first else _from_bytes(data)
