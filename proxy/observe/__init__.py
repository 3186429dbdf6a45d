"""Bookkeeping: trace timings, per-host stats, the outcome record and the log.

Imports only ``proxy.rules``.
"""
