"""Ledger storage: tables, queries and the group-commit writer."""
