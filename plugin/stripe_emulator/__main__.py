"""``python -m plugin.stripe_emulator --port N``."""

import sys

from plugin.stripe_emulator.server import main

sys.exit(main())
