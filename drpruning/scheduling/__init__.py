"""Distributionally robust data scheduling: DRO in a chi-square ball, the scaling-law reference loss,
the policies (constant, sheared, dro, drpruning) and the `data_scheduler` callback that applies them."""
