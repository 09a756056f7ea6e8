"""`meterline keys create|list|revoke`: customer API keys (shown once, stored hashed)."""

from __future__ import annotations

import sys
from typing import TextIO

from plugin import runtime
from plugin.cli.common import customer_id_arg
from plugin.ledger import store


def cmd_keys_create(args, out: TextIO) -> None:
    key_id, secret = store.create_key(runtime.current().engine, args.customer_id)
    print(secret, file=out)
    print(f"key {key_id} created for {args.customer_id}; the key is shown only once", file=sys.stderr)


def cmd_keys_list(args, out: TextIO) -> None:
    for key in store.list_keys(runtime.current().engine, args.customer_id):
        state = "revoked" if key.revoked_at else "active"
        print(f"{key.id}\t{state}\t{store.as_utc(key.created_at).isoformat()}", file=out)


def cmd_keys_revoke(args, out: TextIO) -> None:
    store.revoke_key(runtime.current().engine, args.key_id)
    print(f"key {args.key_id} revoked", file=out)


def register(commands) -> None:
    keys = commands.add_parser("keys", help="manage customer API keys").add_subparsers(dest="action", required=True)
    create = keys.add_parser("create", help="create a key (printed once)")
    create.add_argument("customer_id", type=customer_id_arg)
    create.set_defaults(run=cmd_keys_create)
    key_list = keys.add_parser("list", help="list a customer's keys")
    key_list.add_argument("customer_id", type=customer_id_arg)
    key_list.set_defaults(run=cmd_keys_list)
    revoke = keys.add_parser("revoke", help="revoke a key by its id")
    revoke.add_argument("key_id")
    revoke.set_defaults(run=cmd_keys_revoke)
