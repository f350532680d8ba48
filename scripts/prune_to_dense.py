"""Export a DRPruning run (or one of its checkpoints) as a dense, stock Hugging Face model.

Example:
    python scripts/prune_to_dense.py runs/prune-smollm2 models/smollm2-pruned [--overwrite] [--no-verify]

RUN_OR_CHECKPOINT is a run folder (its latest checkpoint), a Composer checkpoint file, or a sharded
(FSDP) checkpoint folder. See drpruning/export/convert.py.
"""

import sys

from drpruning.export.convert import main

if __name__ == "__main__":
    sys.exit(main())
