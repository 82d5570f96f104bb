"""Settings of the Ollama/OpenAI-compatible proxy (``[proxy]`` in ``config.toml``).

The class lives in ``gpufleet.settings`` (the proxy package imports settings, so the
reverse import would be circular); it is re-exported here for the proxy's modules.
A pool may override ``max_wait_s`` with its own field of that name.
"""

from __future__ import annotations

from gpufleet.settings import ProxySettings

__all__ = ["ProxySettings"]
