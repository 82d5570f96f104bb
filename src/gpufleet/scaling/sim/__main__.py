"""``python -m gpufleet.scaling.sim``: the same as ``gpufleet simulate``."""

from gpufleet.scaling.sim.report import main

raise SystemExit(main())
