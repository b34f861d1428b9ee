"""Peer nodes: PB RPC, durable outbox, Redis pub/sub bridge."""
