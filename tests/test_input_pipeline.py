"""Input pipeline tests: the shapes set and COCO captions (TFDS mock data)."""

import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import coco
from configs import tiny
from visionspeak_jax import errors
from visionspeak_jax.data import input_pipeline
from visionspeak_jax.text import vocabulary as vocab_lib


def _coco_config():
  config = coco.get_config()
  config.image_size = 32
  config.batch_size = 4
  config.shuffle_buffer_size = 8
  config.max_caption_length = 6
  config.vocab_min_count = 1
  return config


_WORDS = ["man", "woman", "dog", "horse", "riding", "beach", "table", "red",
          "pizza", "street", "sitting", "two", "on", "a", "the", "of"]


def _mock_coco(self, split, decoders=None, read_config=None, **kwargs):
  """COCO-captions-shaped examples: odd-sized images, 5-7 raw captions.

  TFDS's random mock of coco_captions breaks on its `objects` sequence, so
  the examples come from here; the structure is that of the real features.
  """
  del read_config, kwargs
  skip_image = bool(decoders) and "image" in decoders
  seed = sum(map(ord, str(split)))
  rng = np.random.RandomState(seed)
  examples = []
  for i in range(12):
    image = rng.randint(0, 256, (rng.randint(20, 60), rng.randint(20, 60), 3),
                        dtype=np.uint8)
    captions = [" ".join(rng.choice(_WORDS, rng.randint(3, 12))).capitalize()
                + "." for _ in range(rng.randint(5, 8))]
    examples.append({
        "image": tf.io.encode_jpeg(image).numpy() if skip_image else image,
        "image/id": seed * 1000 + i,
        "captions": {"id": np.arange(len(captions)),
                     "text": np.array(captions, dtype=object)}})

  def gen():
    yield from examples

  image_spec = (tf.TensorSpec([], tf.string) if skip_image else
                tf.TensorSpec([None, None, 3], tf.uint8))
  return tf.data.Dataset.from_generator(gen, output_signature={
      "image": image_spec,
      "image/id": tf.TensorSpec([], tf.int64),
      "captions": {"id": tf.TensorSpec([None], tf.int64),
                   "text": tf.TensorSpec([None], tf.string)}})


def test_coco_captions_on_mock_data():
  config = _coco_config()
  with tfds.testing.mock_data(as_dataset_fn=_mock_coco):
    source = input_pipeline.TfdsSource(config)
    assert source.input_key == "image" and source.run_info == {}
    vocab = vocab_lib.Vocabulary.build(source.captions(config.train_split))
    assert len(vocab) > 4
    ds = source.train_dataset(vocab, seed=0, process_index=1,
                              process_count=2)
    batch = next(ds.as_numpy_iterator())
    assert batch["image"].shape == (2, 32, 32, 3)
    assert batch["image"].dtype == np.uint8
    # The recipe's five references per image, each row a caption.
    assert config.captions_per_image == 5
    assert batch["tokens"].shape == (2, 5, 8)
    tokens = batch["tokens"].reshape(10, 8)
    assert (tokens[:, 0] == vocab_lib.BOS_ID).all()
    # Exactly one EOS per row, followed only by padding.
    for row in tokens:
      (eos,) = np.flatnonzero(row == vocab_lib.EOS_ID)
      assert (row[eos + 1:] == vocab_lib.PAD_ID).all()
      assert (row[1:eos] >= 4).all() or (row[1:eos] == vocab_lib.UNK_ID).any()
    examples = list(source.eval_examples(config.eval_split, num_examples=5))
    assert len(examples) == 5
    assert all(ex.references and ex.inputs.shape == (32, 32, 3)
               for ex in examples)
    assert all(ex.objects == [] for ex in examples)
    assert examples[0].references[0].endswith(".")
    # Vocabulary words are lowercased and stripped of punctuation.
    assert "man" in vocab.words and "Man" not in vocab.words


def test_coco_not_prepared_is_one_clear_sentence(tmp_path):
  config = _coco_config()
  config.data_dir = str(tmp_path)
  source = input_pipeline.TfdsSource(config)
  with pytest.raises(input_pipeline.DataError,
                     match=r"not prepared .* run `tfds build coco_captions"):
    source.captions(config.train_split)


def test_unknown_dataset_and_split(tiny_data_dir):
  config = tiny.get_config()
  config.dataset = "no_such_dataset_here"
  with pytest.raises(input_pipeline.DataError, match="Unknown dataset"):
    input_pipeline.TfdsSource(config)
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  source = input_pipeline.TfdsSource(config)
  with pytest.raises(input_pipeline.DataError, match="Split 'trian'"):
    source.captions("trian")


def test_shapes_pipeline_is_deterministic_and_sharded(tiny_data_dir):
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  source = input_pipeline.TfdsSource(config)
  vocab = vocab_lib.Vocabulary.build(source.captions(config.train_split))
  assert {"red", "circle", "left"} <= set(vocab.words)

  def first_batches(seed, index, count):
    ds = source.train_dataset(vocab, seed=seed, process_index=index,
                              process_count=count)
    return [b for _, b in zip(range(3), ds.as_numpy_iterator())]

  a, b = first_batches(0, 0, 1), first_batches(0, 0, 1)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["tokens"], y["tokens"])
  c = first_batches(1, 0, 1)
  assert not np.array_equal(a[0]["image"], c[0]["image"])
  half = first_batches(0, 1, 2)[0]
  assert half["image"].shape[0] == config.batch_size // 2

  examples = list(source.eval_examples("test", 10))
  assert len(examples) == 10
  assert len({ex.image_id for ex in examples}) == 10
  for ex in examples:
    assert len(ex.references) == 5
    assert 1 <= len(ex.objects) <= 3
    for obj in ex.objects:
      assert obj["color"] in ex.references[0]
  batches = list(input_pipeline.batch_eval_examples(iter(examples), 4))
  assert [len(names) for _, names in batches] == [4, 4, 2]
  assert all(inputs.shape[0] == 4 for inputs, _ in batches)


def test_pipelines_run_without_the_autotuning_thread(tiny_data_dir,
                                                     monkeypatch):
  """Every pipeline the training reads: destroying an iterator whose
  autotuning thread sleeps waits for it to wake (up to a minute)."""
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  source = input_pipeline.TfdsSource(config)
  read = []
  as_numpy = tfds.as_numpy

  def recording_as_numpy(ds):
    read.append(ds.options().autotune.enabled)
    return as_numpy(ds)

  monkeypatch.setattr(input_pipeline.tfds, "as_numpy", recording_as_numpy)
  vocab = vocab_lib.Vocabulary.build(source.captions(config.train_split))
  assert len(list(source.eval_examples("test", 3))) == 3
  assert read == [False, False]
  ds = source.train_dataset(vocab, seed=0)
  assert ds.options().autotune.enabled is False
  plain = tf.data.Dataset.range(3).map(lambda x: x,
                                       num_parallel_calls=tf.data.AUTOTUNE)
  assert plain.options().autotune.enabled is not False  # What it changes.


def test_encode_captions_agrees_with_the_vocabulary():
  vocab = vocab_lib.Vocabulary.build(["a red circle", "two blue squares"])
  texts = ["A red circle.", "", "two  blue, squares left of a red circle",
           "an unknown word"]
  table = input_pipeline.make_token_table(vocab)
  got = input_pipeline.encode_captions(tf.constant(texts), table, 4).numpy()
  assert got.shape == (4, 6) and got.dtype == np.int32
  for row, text in zip(got, texts):
    ids = [vocab_lib.BOS_ID] + vocab.encode(text)[:4] + [vocab_lib.EOS_ID]
    assert row.tolist() == ids + [vocab_lib.PAD_ID] * (6 - len(ids)), text


def test_shard():
  batch = {"x": np.arange(12).reshape(6, 2)}
  out = input_pipeline.shard(batch, 3)
  assert out["x"].shape == (3, 2, 2)
  np.testing.assert_array_equal(out["x"][1], [[4, 5], [6, 7]])


def test_batch_size_must_divide_over_processes(tiny_data_dir):
  config = tiny.get_config()
  config.data_dir = tiny_data_dir
  vocab = vocab_lib.Vocabulary.build(["a red circle"])
  with pytest.raises(errors.ConfigError, match="divisible"):
    input_pipeline.TfdsSource(config).train_dataset(
        vocab, seed=0, process_index=0, process_count=3)
