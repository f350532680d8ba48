"""Plot a DRPruning run: PNGs and a markdown page from its run folder.

Example:
    python scripts/plot_run.py runs/prune-smollm2 [--out DIR]

Writes RUN_DIR/plots/README.md (or DIR/README.md) with the data schedule (paper Figure 5), sparsity and
Lagrange multipliers, losses, per-domain eval loss, mask convergence (paper Figure 7) and data usage
(paper Table 3). See drpruning/plots.py.
"""

import sys

from drpruning.plots import main

if __name__ == "__main__":
    sys.exit(main())
