"""The words of the shapes set's captions, without the dataset builder.

`visionspeak_jax.data.datasets.shapes` draws the captions from these words and
`visionspeak_jax.evaluation.metrics` parses them; keeping the words here lets
the metrics run without importing TensorFlow Datasets. The caption grammar is
described in `visionspeak_jax.data.datasets.shapes`.

No word is both a colour and a shape, and no other caption word is either:
`metrics.parse_objects` relies on that. The order of `COLORS`, `SHAPES` and
`SIZES` is the order of the dataset's ClassLabel indices, so changing it
changes the stored data.
"""

COLORS = ["red", "green", "blue", "yellow", "purple", "orange"]
SHAPES = ["circle", "square", "triangle", "diamond"]
SIZES = ["small", "large"]

# Where one object lies relative to another.
LEFT_OF = "to the left of"
RIGHT_OF = "to the right of"
ABOVE = "above"
BELOW = "below"

# The order in which two or three objects are listed.
LEFT_TO_RIGHT = "from left to right"
RIGHT_TO_LEFT = "from right to left"
TOP_TO_BOTTOM = "from top to bottom"
BOTTOM_TO_TOP = "from bottom to top"
