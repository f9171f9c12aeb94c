"""COCO captions at the references' grid: 14x14 = 196 regions of 2048.

`configs/coco.py` with the region grid of both PyTorch references:
ruotianluo's `scripts/prepro_feats.py` pools the ResNet-101 map of a
full-size COCO image (about 20x15) down to 14x14 (`--att_size 14`), and
sgrvinod's `models.Encoder` pools its map to 14x14 too. Here the images are
448 px, whose ResNet-101 map is 14x14 itself: every region is a real cell
of the map, as in ruotianluo's features, and the batch stays square.
sgrvinod's own way, 256 px images whose 8x8 map is spread over 14x14 by
repeating cells, is `--config.image_size=256
--config.model.grid_upsample=True`. Every other field is `coco.py`'s;
docs/recipes.md compares them with the references':

  python -m visionspeak_jax.main --config=configs/coco_14x14.py:8 \
      --workdir=$HOME/sat-coco-14 --config.data_dir=$HOME/tensorflow_datasets \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

The number after the colon is the accelerator count, as in `coco.py`. The
decoder's attention costs four times `coco.py`'s per word
(benchmarks/README.md).
"""

from configs import coco

IMAGE_SIZE = 448  # ResNet-101 (stride 32) -> a 14x14 map.
GRID = 14


def get_config(devices: str | None = None):
  """`coco.py` at 448 px over 14x14 regions."""
  config = coco.get_config(devices)
  config.image_size = IMAGE_SIZE
  config.model.grid = GRID
  # The paper's code weighs the penalty per region as coco.py derives it;
  # with R = 196 regions the same weight is alpha_c B / (R L) = 64 / 2156.
  config.alpha_c = 0.03
  return config
