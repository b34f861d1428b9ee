"""msgd's test suite: run with ``python -m twisted.trial tests`` (``make test``)."""
