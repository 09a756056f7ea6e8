"""meterline: usage-based billing inside the LiteLLM proxy."""

__version__ = "0.1.0"
