"""``python -m plugin.stripe.emulator --port N``."""

import sys

from plugin.stripe.emulator.server import main

sys.exit(main())
