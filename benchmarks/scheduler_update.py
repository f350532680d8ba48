"""Time one full DRPruning data-scheduler update on one core: 8 domains with 64 history points each,
the scaling-law fit of every domain, the χ²-ball DRO and the reference-ratio drift.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/scheduler_update.py [--repeats 7]

Prints the median wall time (budget: ≤ 0.5 s) and the median CPU time (the better figure on a
shared machine, where wall time also counts other processes).
"""

from __future__ import annotations

import argparse
import os

for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[variable] = "1"

import statistics  # noqa: E402
import time  # noqa: E402

import numpy as np  # noqa: E402
from threadpoolctl import threadpool_limits  # noqa: E402

from drpruning.scheduling.policies import Observation, PolicySettings, make_policy  # noqa: E402

DOMAINS = 8
HISTORY = 64
TOTAL_UPDATES = 160  # the 64 points cover the first 40% of training
TOKENS_PER_UPDATE = 50 * 131_072
SOURCE_PARAMS, TARGET_PARAMS = 6.7e9, 1.3e9


def _losses(step: int, rng: np.random.Generator) -> list[float]:
    progress = step / TOTAL_UPDATES
    params = _params(step)
    base = np.linspace(1.6, 2.4, DOMAINS)
    return (base + 0.6 * (params / 1e9) ** -0.3 * progress ** -0.25 + rng.normal(0, 0.01, DOMAINS)).tolist()


def _params(step: int) -> float:
    """Expected size shrinking to the target over the first 20% of training (the Lagrangian warm-up)."""
    return SOURCE_PARAMS - (SOURCE_PARAMS - TARGET_PARAMS) * min(step / (0.2 * TOTAL_UPDATES), 1.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    p0 = rng.dirichlet(np.full(DOMAINS, 5.0))
    shares = p0 * TOKENS_PER_UPDATE
    history = [{"progress": step / TOTAL_UPDATES, "params": _params(step), "tokens": (shares * step).tolist(),
                "losses": _losses(step, rng)} for step in range(1, HISTORY + 1)]
    reference = np.min([entry["losses"] for entry in history], axis=0) + 0.05
    policy = make_policy("drpruning", p0, reference, PolicySettings(max_history=HISTORY))
    state = {**policy.state_dict(), "history": history}
    step = HISTORY + 1
    observation = Observation(losses=np.array(_losses(step, rng)), tokens=shares * step,
                              progress=step / TOTAL_UPDATES, params=_params(step), params_end=TARGET_PARAMS)

    walls, cpus = [], []
    with threadpool_limits(limits=1):
        for _ in range(args.repeats):
            policy.load_state_dict(state)
            wall, cpu = time.perf_counter(), time.process_time()
            decision = policy.update(observation)
            walls.append(time.perf_counter() - wall)
            cpus.append(time.process_time() - cpu)
    assert len(policy.history) == HISTORY and np.all(decision.reference_losses <= reference)
    print(f"one update ({DOMAINS} domains x {HISTORY} points, fit + DRO + drift): "
          f"median wall {statistics.median(walls):.3f} s, median CPU {statistics.median(cpus):.3f} s "
          f"over {args.repeats} repeats")


if __name__ == "__main__":
    main()
