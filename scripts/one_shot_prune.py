"""One-shot importance pruning: a source HF model + a target shape + calibration data → a dense HF model.

Example (the demo's target):
    python scripts/one_shot_prune.py runs/demo/source runs/one-shot --data runs/demo/data \
        --target n_layers=20 hidden_size=384 n_heads=6 n_kv_heads=2 intermediate_size=1024

No training: units are ranked by one calibration pass (drpruning/pruning/importance.py) and exported like a
pruning run's checkpoint (same pruning.json, same logit verification). See drpruning/export/one_shot.py.
"""

import sys

from drpruning.export.one_shot import main

if __name__ == "__main__":
    sys.exit(main())
