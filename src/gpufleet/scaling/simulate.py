"""Moved to the ``gpufleet.scaling.sim`` package (traces, engine, baselines, report, replay).

Kept so ``python -m gpufleet.scaling.simulate`` and ``from gpufleet.scaling import simulate``
still work; new code imports ``gpufleet.scaling.sim``.
"""

from gpufleet.scaling.sim import *  # noqa: F403
from gpufleet.scaling.sim import __all__ as __all__
from gpufleet.scaling.sim.report import main

if __name__ == "__main__":
    raise SystemExit(main())
