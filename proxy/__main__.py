"""``tracing-proxy`` / ``python -m proxy``: run until SIGTERM or SIGINT, then drain and exit 0."""

from __future__ import annotations

import asyncio
import gc
import os
import signal
import sys

from aiohttp import http_parser

from proxy import __version__, config
from proxy.config import Settings
from proxy.observe import log
from proxy.server import ListenError, ProxyServer
from proxy.tls.certs import CAError, CertificateAuthority, write_ca


def c_parser_in_use() -> bool:
    """aiohttp's pure-Python parser has had request smuggling bugs; we want llhttp."""
    return http_parser.HttpRequestParser.__module__ == "aiohttp._http_parser"


async def serve(settings: Settings) -> int:
    logger = log.get_logger()
    loop = asyncio.get_running_loop()
    signals: asyncio.Queue[signal.Signals] = asyncio.Queue()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, signals.put_nowait, sig)

    for name, closest in config.unknown_environment(os.environ):
        logger.warning("unknown_setting", variable=name, did_you_mean=closest)
    for setting, reason in config.ignored_settings(settings):
        logger.warning("ignored_setting", setting=setting, reason=reason)
    server = ProxyServer(settings)
    try:
        await server.start()
    except ListenError as exc:
        # One line and exit 2, like a bad setting value: the fix is the same kind of change.
        option = config.option(exc.field)
        print(f"tracing-proxy: error: {option.flag} ({option.env}): {exc}", file=sys.stderr)
        return 2
    logger.info(
        "listening",
        proxy=f"http://{server.proxy_address}",
        metrics=f"http://{server.admin_address}/metrics" if server.admin_address else None,
        version=__version__,
        loop=type(loop).__module__,
    )
    # Everything loaded so far lives as long as the process: leave it out of the cyclic
    # collector's full passes (with the capped stats, a pass measured 30-50 ms on the loop,
    # 4-7 ms with the startup objects frozen).
    gc.freeze()
    log.flush()
    try:
        first = await signals.get()
        # SIGTERM (Kubernetes) keeps serving through the grace period; Ctrl-C does not.
        grace = settings.shutdown_grace if first == signal.SIGTERM else 0.0
        logger.info("signal", signal=first.name)
        drain = asyncio.ensure_future(server.drain(grace, settings.drain_timeout))
        second = asyncio.ensure_future(signals.get())
        await asyncio.wait({drain, second}, return_when=asyncio.FIRST_COMPLETED)
        if not drain.done():
            logger.warning("drain_skipped", signal=second.result().name)
            drain.cancel()
        second.cancel()
    finally:
        await server.close()
        logger.info("stopped")
    return 0


def make_ca(args: list[str]) -> int:
    """``tracing-proxy ca DIR``: a new interception CA in DIR; never overwrites one."""
    parser = config.build_ca_parser()
    directory: str = parser.parse_args(args).directory  # --help exits 0, a bad call 2
    try:
        cert_path, key_path = write_ca(directory)
    except OSError as exc:
        print(f"tracing-proxy: error: {exc}", file=sys.stderr)
        return 1
    print(f"wrote {cert_path} (give it to clients) and {key_path} (mode 0600, keep it secret)")
    return 0


def check_ca(settings: Settings) -> None:
    """With --intercept, the CA must load before we listen: exit 2 naming the setting if not."""
    if not settings.intercept:
        return
    try:
        CertificateAuthority.load(settings.ca_cert, settings.ca_key)
    except CAError as exc:
        sys.stderr.write(config.error_line(exc.setting, str(exc)))
        sys.exit(2)


def main() -> None:
    if sys.argv[1:2] == ["ca"]:
        sys.exit(make_ca(sys.argv[2:]))
    settings = config.load_from_process()
    check_ca(settings)
    log.configure(settings.log_format, settings.log_level)
    if not c_parser_in_use():
        print("tracing-proxy: error: aiohttp's C HTTP parser is not available", file=sys.stderr)
        sys.exit(1)
    if settings.event_loop == "uvloop":
        import uvloop

        code = uvloop.run(serve(settings))
    else:
        code = asyncio.run(serve(settings))
    sys.exit(code)


if __name__ == "__main__":
    main()
