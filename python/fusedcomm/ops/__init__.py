"""Frontends, one module per op family; each registers its torch custom ops."""
