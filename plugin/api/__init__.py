"""HTTP API mounted on the proxy under /meterline/v1."""

from plugin.api import controls, page, pricing, usage  # noqa: F401,E402  (registers their routes on `router`)
from plugin.api.routes import PREFIX, router

__all__ = ["PREFIX", "router"]
