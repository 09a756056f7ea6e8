"""Where meter events go: a protocol (base.py) and its implementations (stripe.py, openmeter.py)."""
