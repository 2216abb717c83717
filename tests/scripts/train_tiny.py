"""Run a tiny training in a fresh process (MirroredStrategy tests need devices set before TF starts).

usage: train_tiny.py seg|cls RECORDS MODELS LOGDIR STRATEGY [N_CPUS] [EPOCHS] [PRECISION] [OVERRIDES_JSON]
OVERRIDES_JSON: a JSON object of dotted settings on top of tests/tiny.py's, e.g. '{"classifier.backbone": "..."}'.
Prints one JSON line with the pipeline entry.
"""

import json
import sys

kind, records, models, logdir, strategy = sys.argv[1:6]
n_cpus = int(sys.argv[6]) if len(sys.argv) > 6 else 1
epochs = int(sys.argv[7]) if len(sys.argv) > 7 else 1
precision = sys.argv[8] if len(sys.argv) > 8 else "float32"
overrides = json.loads(sys.argv[9]) if len(sys.argv) > 9 else {}

from kmel.training.distribute import split_cpu  # noqa: E402

if n_cpus > 1:
    split_cpu(n_cpus)

from kmel.training.train import fit_classifier, fit_segmenter  # noqa: E402
from tests.tiny import tiny_config  # noqa: E402

config = tiny_config(epochs=epochs, **overrides)
fit = fit_segmenter if kind == "seg" else fit_classifier
entry = fit(records, models, config, logdir, strategy=strategy, precision=precision, verbose=0)
print("RESULT " + json.dumps({"replicas": entry["replicas"], "precision": entry["precision"],
                               "epochs_run": entry["epochs_run"], "metrics": entry["metrics"],
                               "weights_digest": entry["weights_digest"]}))
