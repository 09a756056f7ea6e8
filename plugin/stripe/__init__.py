"""Everything that speaks to Stripe apart from meter-event delivery (plugin/sinks/stripe.py): the catalog
(`setup`), webhooks, and the local Stripe-compatible emulator (`emulator`)."""
