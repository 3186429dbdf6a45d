"""I/O on the proxy listener and toward upstreams: forwarding, tunnels, guards and limits."""
