"""TLS: upstream contexts and the timed connector; minting (``certs``, pure) and interception."""
