"""HTTP API mounted on the proxy under /meterline/v1."""

from plugin.api.routes import PREFIX, router
from plugin.api import controls  # noqa: F401,E402  (registers its routes on `router`)

__all__ = ["PREFIX", "router"]
