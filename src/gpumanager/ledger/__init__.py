"""The usage ledger: who used what, when, and what it cost (DESIGN.md §10)."""
