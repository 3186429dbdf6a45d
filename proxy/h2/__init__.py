"""HTTP/2 towards clients and origins: a sans-IO core (``core``) and its asyncio protocols."""
