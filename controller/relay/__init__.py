"""The relay: the tunnel endpoint that authenticates agents and brokers streams."""
