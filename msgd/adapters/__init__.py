"""Deferred-based clients for external systems."""
