"""Each process's share of the evaluation, and putting the shares together."""

import numpy as np
import pytest
import tensorflow_datasets as tfds

from configs import tiny
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.platform import parallel


@pytest.mark.parametrize("count", [1, 2, 3, 4, 7])
@pytest.mark.parametrize("length", [0, 1, 5, 12, 13])
def test_shares_make_the_stream_again(count, length):
  shares = [list(parallel.share(iter(range(length)), i, count))
            for i in range(count)]
  assert sorted(x for s in shares for x in s) == list(range(length))
  assert max(map(len, shares)) - min(map(len, shares)) <= 1
  for i, items in enumerate(shares):
    assert items == list(range(i, length, count))  # Round-robin, in order.
  assert parallel.interleave(shares) == list(range(length))


def test_share_defaults_to_this_process_and_checks_it():
  assert parallel.process() == (0, 1)
  assert list(parallel.share("abc")) == ["a", "b", "c"]
  assert parallel.is_first_process()
  for index, count in ((2, 2), (-1, 2), (0, 0)):
    with pytest.raises(ValueError, match="does not exist"):
      parallel.process(index, count)


def test_one_process_gathers_and_broadcasts_its_own_objects():
  record = {"words": ["a", "red", "circle"], "alphas": np.ones((3, 4))}
  assert parallel.gather_objects(record) == [record]
  assert parallel.gather_objects(record)[0] is record
  assert parallel.broadcast_object(record) is record


def test_bytes_round_trip():
  value = [(1, ["x"], np.arange(6, dtype=np.float32).reshape(2, 3)), None]
  back = parallel._from_bytes(parallel._to_bytes(value))
  assert back[0][:2] == value[0][:2] and back[1] is None
  np.testing.assert_array_equal(back[0][2], value[0][2])


def test_tfds_eval_shares_cap_the_split_first(tiny_data_dir):
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  source = input_pipeline.TfdsSource(config)
  whole = list(source.eval_examples("test", 7))
  assert len(whole) == 7
  for count in (2, 3):
    shares = [list(source.eval_examples("test", 7, process_index=i,
                                        process_count=count))
              for i in range(count)]
    assert ([ex.image_id for ex in parallel.interleave(shares)] ==
            [ex.image_id for ex in whole])
    for ex, alone in zip(parallel.interleave(shares), whole):
      np.testing.assert_array_equal(ex.inputs, alone.inputs)
      assert ex.references == alone.references
      assert ex.objects == alone.objects
  # Images decoded after the split is shared are TFDS's own, resized.
  ds = source.builder.as_dataset(split="test").take(7)
  for ex, alone in zip(tfds.as_numpy(ds), whole):
    assert int(ex["image/id"]) == alone.image_id
    np.testing.assert_array_equal(
        np.asarray(input_pipeline.resize_image(ex["image"],
                                               config.image_size)),
        alone.inputs)
