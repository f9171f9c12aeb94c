"""Captions 64 shapes test images with the CLI: beam 5 vs greedy, figures, speed.

  python benchmarks/caption_shapes.py WORKDIR OUT_DIR

WORKDIR is a finished default run (configs/shapes.py). Writes the 64 test
images as PNG files under OUT_DIR/images, runs `visionspeak_jax.caption` on
them greedily and with beam 5 (figures to OUT_DIR/figures), prints the
content F1 of both, then times `caption.caption_arrays` at batch 64.
"""
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import numpy as np
from PIL import Image
import tensorflow_datasets as tfds
from visionspeak_jax import shapes, metrics, caption

workdir, out = sys.argv[1], sys.argv[2]
os.makedirs(out + '/images', exist_ok=True)
builder = tfds.builder('shapes_captions/default')
objects = {}
for i, ex in enumerate(tfds.as_numpy(builder.as_dataset(split='test').take(64))):
  path = f"{out}/images/test_{i:02d}.png"
  Image.fromarray(ex['image']).save(path)
  names = builder.info.features['objects']['color'].names, builder.info.features['objects']['shape'].names
  objects[path] = [(names[0][c], names[1][s]) for c, s in zip(ex['objects']['color'], ex['objects']['shape'])]
paths = sorted(objects)
res = {}
for beam in (1, 5):
  t = time.time()
  proc = subprocess.run([sys.executable, '-m', 'visionspeak_jax.caption', f'--workdir={workdir}', f'--beam_size={beam}',
                         '--batch_size=64', '--json'] + ([f'--output={out}/figures'] if beam == 5 else []) + paths,
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = [json.loads(l) for l in proc.stdout.splitlines()]
  preds = {l['image']: l['caption'] for l in lines}
  f1 = metrics.content_f1([preds[p] for p in paths], [objects[p] for p in paths])
  res[beam] = f1['content_f1']
  print(f"beam {beam}: {len(lines)} captions, content F1 {f1['content_f1']:.4f}, CLI wall {time.time()-t:.1f}s")
  print('  e.g.', lines[0]['image'].split('/')[-1], '->', lines[0]['caption'])
print('figures written:', len(os.listdir(out + '/figures')))
# images/s of beam 5 at batch 64, in the library after warm-up.
cap = caption.load_captioner(workdir)
images = np.stack([caption.load_image(p, cap.image_size) for p in paths])
for beam in (1, 5):
  caption.caption_arrays(cap, images, beam_size=beam, batch_size=64)
  t = time.time(); n = 5
  for _ in range(n): caption.caption_arrays(cap, images, beam_size=beam, batch_size=64)
  dt = (time.time() - t) / n
  print(f"beam {beam} batch 64: {64/dt:.1f} images/s ({dt*1000:.0f} ms per batch, incl. encoder)")
