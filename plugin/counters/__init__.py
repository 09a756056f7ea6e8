"""A customer's credit counters for the current period: used and reserved, changed atomically.

Two backends behind one protocol (base.py): the embedded store (sql.py, tables in the ledger's
own database) and Redis (redis.py, one Lua script per operation, keys from keys.py).
"""
