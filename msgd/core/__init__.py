"""Transport-free logic: requests, dispatch, app modules, pub/sub, errors.

Nothing here opens a socket or imports the global reactor."""
