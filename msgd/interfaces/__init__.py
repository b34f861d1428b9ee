"""One module per protocol: decode → core → encode."""
