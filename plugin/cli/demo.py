"""`meterline demo`: what `make run` uses: the demo customer, its key, ready-to-paste snippets."""

from __future__ import annotations

import io
import os
import time
from pathlib import Path
from typing import TextIO

import stripe

from plugin import runtime
from plugin.cli.common import customer_id_arg
from plugin.cli.stripe_commands import stripe_setup
from plugin.ledger import store
from plugin.services.customers import new_stripe_customer


def cmd_demo(args, out: TextIO) -> None:
    """Create the demo customer and key if missing and print ready-to-paste snippets."""
    meterline = runtime.current()
    engine = meterline.engine
    if store.get_customer(engine, args.customer_id) is None:
        store.add_customer(engine, args.customer_id, args.plan)
    if args.key_file.exists():
        secret = args.key_file.read_text().strip()
    else:
        _, secret = store.create_key(engine, args.customer_id)
        args.key_file.write_text(secret + "\n")
        args.key_file.chmod(0o600)
    stripe_note = _demo_stripe(meterline, args.customer_id, out) if meterline.settings.stripe_api_key else ""
    base = f"http://{args.host}:{args.port}"
    print(f"""
meterline demo: customer '{args.customer_id}' (plan {args.plan}), key saved in {args.key_file}

  curl {base}/v1/chat/completions \\
    -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}], "user": "alice"}}'

  python -c 'from openai import OpenAI; c = OpenAI(base_url="{base}/v1", api_key="{secret}"); \\
print(c.chat.completions.create(model="demo", messages=[{{"role": "user", "content": "Hello"}}]).choices[0].message.content)'

  then: .venv/bin/meterline usage {args.customer_id}

  set a spending limit (the customer's own key) and preview a request:
  curl -X PUT {base}/meterline/v1/limits -H "Authorization: Bearer {secret}" \\
    -H "Content-Type: application/json" -d '{{"hard_limit_ucr": 5000000, "soft_thresholds_pct": [50, 80]}}'
  curl {base}/meterline/v1/preview -H "Authorization: Bearer {secret}" -H "Content-Type: application/json" \\
    -d '{{"model": "demo", "messages": [{{"role": "user", "content": "Hello"}}], "max_tokens": 100}}'

  the operator console, in another terminal:
  LITELLM_MASTER_KEY={_master_key_hint()} .venv/bin/meterline tui --url {base}
{stripe_note}""", file=out)


DEMO_MASTER_KEY = "sk-meterline-demo-master"
"""`make run`'s default master key (a demo value, printed); a key of the operator's own is never printed."""


def _master_key_hint() -> str:
    return DEMO_MASTER_KEY if os.environ.get("LITELLM_MASTER_KEY") == DEMO_MASTER_KEY else "<your master key>"


def _demo_stripe(meterline: runtime.Meterline, customer_id: str, out: TextIO) -> str:
    """Set up the (local) Stripe for the demo: catalog, the demo customer, its subscription.

    The emulator keeps nothing between runs, so a Stripe customer id remembered from an earlier run
    may no longer exist there: the demo (only the demo) then creates a new one.
    """
    setup = stripe_setup(meterline, io.StringIO())
    for attempt in range(50):  # the emulator may still be starting: wait up to ~10 s
        try:
            setup.run()
            break
        except stripe.APIConnectionError:
            if attempt == 49:
                raise
            time.sleep(0.2)
    customer = store.get_customer(meterline.engine, customer_id)
    stripe_id = customer.stripe_customer_id
    if stripe_id is not None:
        try:
            setup.client.v1.customers.retrieve(stripe_id)
        except stripe.InvalidRequestError:
            stripe_id = None
    if stripe_id is None:
        stripe_id = new_stripe_customer(meterline.engine, setup, customer_id)
    setup.subscribe(customer.plan, stripe_id)
    base = meterline.settings.stripe_api_base or "https://api.stripe.com"
    return f"""
  meter events go to Stripe at {base} as {stripe_id}:
        .venv/bin/meterline outbox list          # what is waiting
        curl {base}/_emulator/meter_events       # what the local Stripe emulator received
"""


def register(commands) -> None:
    demo = commands.add_parser("demo", help="create the demo customer and key, print snippets")
    demo.add_argument("--customer-id", type=customer_id_arg, default="demo-customer")
    demo.add_argument("--plan", default="pro")
    demo.add_argument("--key-file", type=Path, default=Path(".meterline-demo-key"))
    demo.add_argument("--host", default="127.0.0.1")
    demo.add_argument("--port", type=int, default=4000)
    demo.set_defaults(run=cmd_demo)
