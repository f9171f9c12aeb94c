"""chair: the synonym table, each reading rule, and hand-counted CHAIR."""

import importlib.resources
import math

import pytest

from visionspeak_jax.data.datasets import coco_rehearsal
from visionspeak_jax.evaluation import chair

_COCO_CATEGORIES = coco_rehearsal.CLASS_NAMES  # COCO's, in id order.


@pytest.fixture(name="table", scope="module")
def _table():
  return chair.coco_table()


def _read(caption, table):
  return chair.mentions(caption, table)


def test_data_file_has_the_80_coco_categories_and_names_its_source(table):
  assert table.categories == _COCO_CATEGORIES
  text = importlib.resources.files("visionspeak_jax.evaluation").joinpath(
      "data/coco_synonyms.txt").read_text()
  header = "".join(line for line in text.splitlines(keepends=True)
                   if line.startswith("#"))
  for source in ("LisaAnne/Hallucination", "data/synonyms.txt",
                 "Object Hallucination in Image Captioning"):
    assert source in header
  assert sum(1 for line in text.splitlines()
             if line.strip() and not line.startswith("#")) == 80


def test_synonyms_name_their_category(table):
  assert _read("A guy on a bike next to a puppy and a sofa.", table) == [
      ("guy", "person"), ("bike", "bicycle"), ("puppy", "dog"),
      ("sofa", "couch")]


def test_tokens_are_lowercased_and_stripped_of_punctuation(table):
  assert _read("DOG, cat! (Giraffe). The dog's bowl?", table) == [
      ("dog", "dog"), ("cat", "cat"), ("giraffe", "giraffe"),
      ("dog", "dog"), ("bowl", "bowl")]
  # nltk keeps a hyphenated word whole, so it matches no name.
  assert _read("a hot-dog", table) == []


def test_baby_or_adult_before_an_animal_is_its_age_not_a_person(table):
  assert _read("a baby elephant", table) == [("elephant", "elephant")]
  assert _read("two adult giraffes", table) == [("giraffe", "giraffe")]
  assert _read("a baby bird", table) == [("bird", "bird")]
  assert _read("a baby and an adult", table) == [
      ("baby", "person"), ("adult", "person")]
  # A baby cub is an animal the table has no category for.
  assert _read("a baby cub", table) == []


def test_passenger_vehicle_is_the_vehicle(table):
  assert _read("a passenger jet", table) == [("jet", "airplane")]
  assert _read("passenger trains", table) == [("train", "train")]
  assert _read("a passenger on a bus", table) == [
      ("passenger", "person"), ("bus", "bus")]


def test_a_toilet_seat_is_no_chair(table):
  assert _read("a toilet seat", table) == [("toilet", "toilet")]
  assert _read("the seat of the toilet is up", table) == [
      ("toilet", "toilet")]
  assert _read("a seat by the window", table) == [("seat", "chair")]
  # Only the word "toilet" drops the seat, as in caption_to_words.
  assert _read("a seat by the urinal", table) == [
      ("seat", "chair"), ("urinal", "toilet")]


def test_two_word_names_are_read_whole(table):
  assert _read("a hot dog, a teddy bear, a fire hydrant, a stop sign and "
               "a traffic light", table) == [
                   ("hot dog", "hot dog"), ("teddy bear", "teddy bear"),
                   ("fire hydrant", "fire hydrant"),
                   ("stop sign", "stop sign"),
                   ("traffic light", "traffic light")]
  assert _read("a motor bike by the street light", table) == [
      ("motor bike", "motorcycle"), ("street light", "traffic light")]
  # Their words apart are not the name.
  assert _read("a hot day and a dog", table) == [("dog", "dog")]


def test_bow_tie_is_a_tie(table):
  assert _read("a man in a bow tie", table) == [
      ("man", "person"), ("tie", "tie")]


def test_a_train_track_is_no_train(table):
  assert _read("a train on the train tracks", table) == [("train", "train")]
  assert _read("a batter at home plate", table) == []


def test_longest_phrase_wins(table):
  assert _read("a stove top oven", table) == [("stove top oven", "oven")]


def test_plurals(table):
  assert _read("dogs, buses, knives, mice, ponies, calves, policemen, "
               "women, people, wine glasses, hot dogs and teddy bears",
               table) == [
                   ("dog", "dog"), ("bus", "bus"), ("knife", "knife"),
                   ("mouse", "mouse"), ("pony", "horse"), ("calf", "cow"),
                   ("policeman", "person"), ("woman", "person"),
                   ("people", "person"), ("wine glass", "wine glass"),
                   ("hot dog", "hot dog"), ("teddy bear", "teddy bear")]
  # Words that end like a plural but are table names stay whole.
  assert _read("a bus, skis and scissors", table) == [
      ("bus", "bus"), ("skis", "skis"), ("scissors", "scissors")]
  assert _read("a glass of water", table) == []


def test_names_the_source_loader_missed_match(table):
  # " motor bike" and " cheesecake" had a leading space, "iPhone" capitals.
  assert _read("motor bike, cheesecake, iphone", table) == [
      ("motor bike", "motorcycle"), ("cheesecake", "cake"),
      ("iphone", "cell phone")]


def test_image_objects_are_labels_and_what_references_name(table):
  objects = chair.image_objects_from(
      ["person", "dining table", "dining table"],
      ["A woman eating a hot dog at a desk.", "A lady with sandwiches."],
      table)
  assert objects == {"person", "dining table", "hot dog", "sandwich"}
  with pytest.raises(ValueError, match="not a name"):
    chair.image_objects_from(["unicorn"], [], table)


def test_chair_counts_by_hand(table):
  captions = {
      # 4 mentions, the dog twice and hallucinated each time; covers 2/2.
      1: "A man riding a horse next to a dog and a dog.",
      # 2 mentions, none hallucinated; covers cat and couch of 3.
      2: "A cat on a couch.",
      # No mention; covers 0/1.
      3: "A view of the sky.",
      # 2 mentions, both hallucinated; no objects, so no coverage.
      4: "Pizza on a table.",
      # 1 mention; covers 1/1.
      5: "A bird.",
  }
  objects = {1: {"person", "horse"}, 2: {"cat", "couch", "remote"},
             3: {"airplane"}, 4: set(), 5: {"bird"}}
  result = chair.chair(captions, objects, table)
  assert result["mentions"] == 9
  assert result["hallucinated_mentions"] == 4
  assert result["chair_i"] == pytest.approx(4 / 9)
  assert result["hallucinated_captions"] == 2
  assert result["captions"] == 5
  assert result["chair_s"] == pytest.approx(2 / 5)
  assert result["coverage"] == pytest.approx((1 + 2 / 3 + 0 + 1) / 4)
  first = result["per_image"][1]
  assert first["hallucinated"] == [("dog", "dog"), ("dog", "dog")]
  assert first["named"] == ["person", "horse", "dog"]
  assert first["coverage"] == 1.0
  assert result["per_image"][4]["named"] == ["pizza", "dining table"]
  assert result["per_image"][4]["coverage"] is None


def test_chair_without_mentions_or_objects():
  result = chair.chair({"a": "nothing here"}, {"a": set()},
                       chair.coco_table())
  assert result["chair_i"] == 0.0
  assert result["chair_s"] == 0.0
  assert math.isnan(result["coverage"])


def test_chair_needs_objects_for_every_captioned_image(table):
  with pytest.raises(ValueError, match="no objects"):
    chair.chair({1: "a dog"}, {}, table)


def test_a_table_from_a_dict():
  shapes = chair.WordTable.from_dict(
      {"red circle": ["red ball"], "blue square": [], "green triangle": []})
  assert shapes.categories == ("red circle", "blue square", "green triangle")
  caption = "Two red circles above a blue square and a red square."
  assert chair.mentions(caption, shapes) == [
      ("red circle", "red circle"), ("blue square", "blue square")]
  result = chair.chair({0: caption, 1: "a red ball"},
                       {0: {"blue square", "green triangle"},
                        1: {"red circle"}}, shapes)
  assert result["chair_i"] == pytest.approx(1 / 3)
  assert result["chair_s"] == pytest.approx(1 / 2)
  assert result["coverage"] == pytest.approx((1 / 2 + 1) / 2)


def test_a_name_in_two_categories_is_refused():
  with pytest.raises(ValueError, match="names both"):
    chair.WordTable.from_dict({"cat": ["kitty"], "dog": ["kitty"]})
