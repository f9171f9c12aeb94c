"""TFDS builders generated on the machine: the shapes set and the COCO
rehearsal."""
