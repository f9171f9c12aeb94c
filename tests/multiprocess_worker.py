"""A worker for test_multiprocess.py (not a test module).

  python tests/multiprocess_worker.py OUT_DIR NUM_PROCESSES PROCESS_ID PORT

Trains three steps of the tiny config on a fixed global batch, each process
feeding its slice, saves an Orbax checkpoint from every process, restores it,
and writes this process's final parameters to OUT_DIR/params_<id>.npz.
NUM_PROCESSES=1 runs alone (no coordinator) on all local devices.
"""

import os
import sys

from batches import fake_batch
import jax
import numpy as np

from configs import tiny
from visionspeak_jax.platform import distributed
from visionspeak_jax.run import checkpoint as checkpoint_lib
from visionspeak_jax.text import vocabulary as vocab_lib
from visionspeak_jax.training import state as state_lib
from visionspeak_jax.training import step as step_lib

GLOBAL_BATCH = 8
VOCAB_SIZE = 20


def main():
  out_dir, num_processes, process_id, port = sys.argv[1:5]
  num_processes, process_id = int(num_processes), int(process_id)
  config = tiny.get_config()
  config.warmup_steps = 0
  config.batch_size = GLOBAL_BATCH
  if num_processes > 1:
    config.coordinator_address = f"127.0.0.1:{port}"
    config.num_processes = num_processes
    config.process_id = process_id
  distributed.initialize(config)
  assert jax.process_count() == num_processes, jax.process_count()

  state = state_lib.create_train_state(jax.random.key(0), config, VOCAB_SIZE)
  p_train_step, _ = step_lib.compile_steps(config)
  local = GLOBAL_BATCH // num_processes
  for step in range(3):
    # The same global batch in every process, whatever the process count.
    batch = fake_batch(config, VOCAB_SIZE, GLOBAL_BATCH, seed=step)
    mine = jax.tree.map(
        lambda x: x[process_id * local:(process_id + 1) * local].reshape(
            (jax.local_device_count(), -1) + x.shape[1:]), batch)
    state, metrics = p_train_step(state, mine, jax.random.key(1))
  jax.block_until_ready(metrics)

  ckpt = checkpoint_lib.Checkpointer(os.path.join(out_dir, "checkpoints"),
                                     write=True)
  vocab = vocab_lib.Vocabulary.build(["a red circle"])
  ckpt.save(3, state, vocab, config)
  ckpt.wait()
  target = state_lib.create_train_state(jax.random.key(5), config, VOCAB_SIZE)
  restored = ckpt.restore_state(target)
  ckpt.close()
  flat = {jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
          for path, leaf in jax.tree_util.tree_leaves_with_path(state.params)}
  restored_flat = {
      jax.tree_util.keystr(path): np.asarray(jax.device_get(leaf))
      for path, leaf in jax.tree_util.tree_leaves_with_path(restored.params)}
  for key, value in flat.items():
    np.testing.assert_array_equal(value, restored_flat[key], err_msg=key)
  np.savez(os.path.join(out_dir, f"params_{process_id}.npz"),
           loss=np.asarray(jax.device_get(metrics["loss"])), **flat)


if __name__ == "__main__":
  main()
