"""Every Prometheus collector gpufleet exports, and nothing else.

Names follow ``gpufleet_<noun>_<unit>``; counters end in ``_total``; labels are
bounded (pool, provider, engine, status, …) — never a task id or an API key.
The default registry also carries prometheus-client's process and platform
collectors (CPU, memory, open fds, Python version).
"""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Info

from gpufleet import __version__

BUILD_INFO = Info("gpufleet_build", "Version of the running gpufleet.")
BUILD_INFO.info({"version": __version__})

UP = Gauge("gpufleet_up", "1 while this replica's API is serving.")

HTTP_REQUESTS = Counter(
    "gpufleet_http_requests_total",
    "HTTP requests answered by gpufleet's own API, by route template and status class.",
    ["route", "status_class"],
)
