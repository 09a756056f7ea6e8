"""HTTP API mounted on the proxy under /meterline/v1."""

from plugin.api.routes import PREFIX, router

__all__ = ["PREFIX", "router"]
