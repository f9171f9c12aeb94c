"""Flickr30k (Karpathy splits): `flickr8k.py`'s recipe on the larger set.

sgrvinod's a-PyTorch-Tutorial-to-Image-Captioning recipe (256 px, a frozen
ImageNet ResNet-101 pooled to 14x14, batch 32 captions, decoder learning
rate 4e-4, gradients clamped to +-5, alpha_c 1, dropout 0.5, sizes 512,
at most 120 epochs over the captions with early stopping on BLEU-4, beam
search at test), as `flickr8k.py` sets it and with its deviations, on
Karpathy's Flickr30k split: 29000 train, 1014 val and 1000 test images.
docs/recipes.md has every field beside its source. The data is Karpathy's
dataset_flickr30k.json and the flickr30k-images folder in one directory
(docs/your_own_data.md). On one GPU:

  python -m visionspeak_jax.main --config=configs/flickr30k.py \
      --workdir=$HOME/sat-flickr30k --config.manual_dir=$HOME/flickr30k \
      --config.model.pretrained_path=$HOME/resnet101.safetensors

A number after a colon is the accelerator count (default 1), as in
`coco.py`.
"""

from configs import flickr8k

TRAIN_IMAGES = 29_000  # Karpathy's Flickr30k training images.


def get_config(devices: str | None = None):
  """`flickr8k.py` on Flickr30k, for `devices` accelerators ("1")."""
  config = flickr8k.get_config(devices)
  config.dataset = "karpathy_captions/flickr30k"
  flickr8k.set_schedule(config, TRAIN_IMAGES)
  return config
