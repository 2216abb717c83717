"""Train the tiny segmenter a few steps on two logical CPUs (MirroredStrategy, global batch 2b) and on one
device (batch 2b) from the same weights; print one JSON line with the largest weight difference.

usage: mirrored_vs_one.py [sync|nosync]   (nosync: plain BatchNorm under MirroredStrategy)
"""

import json
import sys

from kmel.training.distribute import split_cpu  # noqa: E402

split_cpu(2)

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from kmel.models.segmenter import build_segmenter
from kmel.training.losses import TverskyLoss  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

sync = sys.argv[1:2] != ["nosync"]
# No decoder dropout: its masks are drawn per replica, so they could not match one device.
config = tiny_config(**{"segmenter.image_size": 32, "segmenter.decoder_filters": [16, 16, 8, 8, 8],
                     "segmenter.dropout": 0.0}).segmenter
rng = np.random.default_rng(0)
images = rng.uniform(0, 255, (8, 32, 32, 3)).astype("float32")
images[:4] *= 0.3  # two halves with different statistics: per-replica BatchNorm would see it
masks = (rng.uniform(size=(8, 32, 32, 1)) < 0.3).astype("float32")


def train(strategy: tf.distribute.Strategy, sync_batchnorm: bool, weights: list | None) -> list[np.ndarray]:
    keras.utils.set_random_seed(1)
    with strategy.scope():
        model = build_segmenter(config, sync_batchnorm=sync_batchnorm)
        if weights is not None:
            model.set_weights(weights)
        model.compile(optimizer=keras.optimizers.SGD(0.05), loss=TverskyLoss())
    data = tf.data.Dataset.from_tensor_slices((images, masks)).batch(8).repeat()
    model.fit(data, steps_per_epoch=3, epochs=1, verbose=0, shuffle=False)
    return [np.array(w) for w in model.weights]


keras.utils.set_random_seed(1)
start = [np.array(w) for w in build_segmenter(config).weights]
one = train(tf.distribute.OneDeviceStrategy("/cpu:0"), False, start)
two = train(tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"]), sync, start)
moved = max(float(np.abs(a - b).max()) for a, b in zip(one, start))
diff = max(float(np.abs(a - b).max()) for a, b in zip(one, two))
print("RESULT " + json.dumps({"moved": moved, "max_diff": diff, "n_weights": len(one)}))
