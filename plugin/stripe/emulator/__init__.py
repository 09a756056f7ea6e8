"""A local Stripe-compatible server for the demo and the tests.

The unmodified stripe SDK runs against it (``StripeClient(key, base_addresses={"api": URL,
"meter_events": URL})``): customers, products, prices (tiered), subscriptions, billing meters, v1
meter events with Stripe's synchronous rules, v2 meter event sessions and streams with asynchronous
error reports, invoice previews, a whole billing cycle on its clock (draft at period end, finalized after
a grace, held with ``auto_advance=false``, invoice items as credits), signed webhooks as v1 snapshot events
or thin v2 notifications (``GET /v2/core/events``), and a control API (``/_emulator/``) to move the clock,
switch the webhook mode and inject faults. Modules: `forms` (params), `state` (the account, composed
of `catalog`, `meter_events`, `invoices`, `idempotency` and `faults` over one `store`, with `money`,
`clock` and `errors` beneath), `webhooks`, `app` (HTTP), `server` (the process).
Run it with ``python -m plugin.stripe.emulator --port N``.
"""
