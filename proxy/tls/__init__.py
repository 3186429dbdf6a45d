"""TLS: the upstream client contexts and the connector that times handshakes apart from TCP."""
