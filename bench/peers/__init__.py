"""Servers of the peers msgd is compared with; each runs from its own
virtual environment that bench/peers_env.py builds (nothing committed)."""
