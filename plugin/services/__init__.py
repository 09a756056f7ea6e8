"""What the HTTP API (plugin/api) and the CLI (plugin/cli) both do, written once: plain values in,
plain values (JSON-ready dicts) out. Neither front door imports the other; both import these."""
