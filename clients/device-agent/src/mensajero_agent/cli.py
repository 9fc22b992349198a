"""`mensajero-agent`: run a simulated phone against a device-hub.

Prints one JSON line per event on stdout (connected, registered, task, task_dropped,
report, report_ack, incoming, incoming_ack, error, paused, disconnected, stopping,
stopped) so that scripts and demos can follow it. The exit statuses are in EXIT_STATUSES.
No output contains the API key.
"""

import argparse
import asyncio
import contextlib
import math
import os
import signal
import sys
from pathlib import Path
from typing import Any

import orjson

from mensajero_agent import __version__
from mensajero_agent.agent import (
    CLOSE_INVALID_API_KEY,
    Agent,
    AgentConfig,
    AgentStoppedError,
    RegisterRejectedError,
)
from mensajero_agent.backend import SimulatedBackend
from mensajero_agent.ledger import MessageLedger
from mensajero_agent.pacing import DEFAULT_FRAMES_PER_S
from mensajero_agent.urls import invalid_url_reason, redact_api_key

DEFAULT_URL = "ws://127.0.0.1:8001/api/v1/android/ws"
API_KEY_ENV = "MENSAJERO_DEVICE_API_KEY"

EXIT_INVALID_KEY = 2
EXIT_STOPPED_BY_SERVER = 3
EXIT_REGISTER_REJECTED = 4
EXIT_STATUSES = f"""\
exit status:
  0  stopped by Ctrl-C, SIGTERM or --run-for-s (a second Ctrl-C or SIGTERM ends the
     --stop-grace-s wait at once)
  {EXIT_INVALID_KEY}  invalid options, or an invalid API key or a disabled device or account
     (close code 4001)
  {EXIT_STOPPED_BY_SERVER}  the key was revoked, or another connection with the same key
     replaced this one
  {EXIT_REGISTER_REJECTED}  the hub rejected the register because of an option's value, such
     as a --name with a control character; stderr names the option to change
"""

# The options that set each field of the agent's `register`.
REGISTER_FIELD_OPTIONS = {"device_name": "--name", "phone_number": "--phone"}


def parse_incoming(value: str) -> tuple[str, str]:
    """Read "SENDER:TEXT" (split at the first colon) for --incoming."""
    sender, separator, body = value.partition(":")
    if not separator or not sender.strip():
        raise argparse.ArgumentTypeError(
            f"invalid --incoming value {value!r}: expected SENDER:TEXT, "
            "for example '+34600000000:Hola'"
        )
    return sender.strip(), body


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mensajero-agent",
        description="A simulated Android phone for Mensajero: connects to the device-hub,\n"
        "registers, answers tasks with reports and uploads incoming SMS.",
        epilog=EXIT_STATUSES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--url",
        default=DEFAULT_URL,
        help=f"device-hub WebSocket URL (default {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get(API_KEY_ENV),
        help=f"the device's API key (default: the {API_KEY_ENV} environment variable)",
    )
    parser.add_argument("--name", help="device name sent in register")
    parser.add_argument(
        "--phone", help="the phone's own number, E.164 (e.g. +34600000000)"
    )
    parser.add_argument(
        "--send-delay-ms",
        type=float,
        default=200.0,
        help="simulated time to send one SMS, in milliseconds (default 200)",
    )
    parser.add_argument(
        "--failure-rate",
        type=float,
        default=0.0,
        help="share of sends that fail, from 0 to 1 (default 0)",
    )
    parser.add_argument(
        "--delivery-delay-ms",
        type=float,
        default=500.0,
        help="time from sent to the delivery report, in milliseconds (default 500)",
    )
    parser.add_argument(
        "--no-delivery-reports",
        action="store_true",
        help="never report delivered, like a carrier without delivery reports",
    )
    parser.add_argument(
        "--report-parts",
        action="store_true",
        help="report each part of a multipart SMS (part, parts) instead of the whole",
    )
    parser.add_argument(
        "--ping-interval-s",
        type=float,
        help="seconds between pings (default: the interval the hub announces, 60)",
    )
    parser.add_argument(
        "--max-frames-per-s",
        type=float,
        help="maximum frames per second to send (default: the limit the hub announces "
        f"in its register ack, or {DEFAULT_FRAMES_PER_S:g} when it announces none); "
        "a lower limit from the hub still applies",
    )
    parser.add_argument(
        "--incoming",
        type=parse_incoming,
        action="append",
        default=[],
        metavar="SENDER:TEXT",
        help="upload an incoming SMS once connected; repeat for several",
    )
    parser.add_argument(
        "--state-file",
        type=Path,
        help=(
            "file that records handled message ids, and the reports and incoming SMS "
            "not acknowledged yet, across runs (default: memory only)"
        ),
    )
    parser.add_argument(
        "--run-for-s",
        type=float,
        help="stop after this many seconds (default: run until stopped)",
    )
    parser.add_argument(
        "--stop-grace-s",
        type=float,
        default=5.0,
        help="on Ctrl-C, SIGTERM or --run-for-s, seconds to let the sends in flight "
        "finish and be reported before they are cut short (default 5)",
    )
    parser.add_argument(
        "--backoff-max-s",
        type=float,
        default=30.0,
        help="longest wait between reconnect attempts, in seconds (default 30)",
    )
    parser.add_argument(
        "--language",
        default="en",
        help="Accept-Language for server messages, which the agent quotes in its own "
        "English lines (es or en, default en)",
    )
    parser.add_argument("--seed", type=int, help="random seed for failures and backoff")
    parser.add_argument("--version", action="version", version=__version__)
    return parser


def print_event(event: dict[str, Any]) -> None:
    sys.stdout.write(orjson.dumps(event).decode() + "\n")
    sys.stdout.flush()


def print_error(text: str, api_key: str) -> None:
    # The hub's close reason and messages are printed too, so they are redacted.
    sys.stderr.write(redact_api_key(text, api_key) + "\n")


def stopped_hint(error: AgentStoppedError) -> str:
    """Return what the user can do after close code 4001, by the hub's error reason."""
    if error.key_error_reason == "device_inactive":
        return (
            "Enable the device with the API (PUT /api/v1/sms/devices/{id} with "
            '"is_active": true), then start the agent again with the same key.'
        )
    if error.key_error_reason == "user_inactive":
        return (
            "The account that owns the device is disabled. Once it is enabled, start "
            "the agent again with the same key."
        )
    return "Check --api-key, or create or rotate the device's key with the API."


def register_rejected_hint(error: RegisterRejectedError) -> str:
    """Return which options to change after the hub rejected the register."""
    options = [
        f"{REGISTER_FIELD_OPTIONS[field]} (sent as {field})"
        for field in error.fields
        if field in REGISTER_FIELD_OPTIONS
    ]
    if options:
        return f"Change {' and '.join(options)} and start the agent again."
    if error.fields:
        # app_version or protocol_version, which no option sets.
        return (
            f"The hub rejects {', '.join(error.fields)}, which this agent sets itself. "
            "Use a device agent of the hub's version."
        )
    return (
        "Check --name and --phone against the hub's message and start the agent again."
    )


async def run(args: argparse.Namespace) -> int:
    agent = Agent(
        AgentConfig(
            url=args.url,
            api_key=args.api_key,
            device_name=args.name,
            phone_number=args.phone,
            ping_interval_s=args.ping_interval_s,
            backoff_max_s=args.backoff_max_s,
            language=args.language,
            report_parts=args.report_parts,
            max_frames_per_s=args.max_frames_per_s,
            stop_grace_s=args.stop_grace_s,
        ),
        SimulatedBackend(
            send_delay_ms=args.send_delay_ms,
            failure_rate=args.failure_rate,
            delivery_delay_ms=args.delivery_delay_ms,
            delivery_reports=not args.no_delivery_reports,
            seed=args.seed,
        ),
        on_event=print_event,
        ledger=MessageLedger(args.state_file),
        seed=args.seed,
    )
    for sender, body in args.incoming:
        agent.inject_incoming(sender, body)

    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, lambda: asyncio.ensure_future(agent.stop()))
    stopper = None
    if args.run_for_s is not None:
        stopper = loop.call_later(
            args.run_for_s, lambda: asyncio.ensure_future(agent.stop())
        )

    try:
        await agent.run()
    except RegisterRejectedError as error:
        print_error(f"mensajero-agent: {error}", args.api_key)
        sys.stderr.write(register_rejected_hint(error) + "\n")
        return EXIT_REGISTER_REJECTED
    except AgentStoppedError as error:
        print_error(f"mensajero-agent: {error}", args.api_key)
        if error.code != CLOSE_INVALID_API_KEY:
            return EXIT_STOPPED_BY_SERVER
        sys.stderr.write(stopped_hint(error) + "\n")
        return EXIT_INVALID_KEY
    finally:
        if stopper is not None:
            stopper.cancel()
    return 0


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.api_key:
        parser.error(f"missing API key: pass --api-key or set {API_KEY_ENV}")
    url_problem = invalid_url_reason(args.url)
    if url_problem is not None:
        redacted_url = redact_api_key(args.url, args.api_key)
        parser.error(
            f"invalid --url {redacted_url!r}: {url_problem}. Use the device-hub's WebSocket "
            f"URL, such as {DEFAULT_URL}"
        )
    if not 0.0 <= args.failure_rate <= 1.0:
        parser.error(
            f"invalid --failure-rate {args.failure_rate}: use a value from 0 to 1"
        )
    if args.send_delay_ms < 0 or args.delivery_delay_ms < 0:
        parser.error(
            "invalid delay: --send-delay-ms and --delivery-delay-ms must be 0 or more"
        )

    if not (math.isfinite(args.stop_grace_s) and args.stop_grace_s >= 0):
        parser.error(
            f"invalid --stop-grace-s {args.stop_grace_s}: use a number of seconds, "
            "0 or more"
        )

    if args.max_frames_per_s is not None and not args.max_frames_per_s > 0:
        parser.error(
            f"invalid --max-frames-per-s {args.max_frames_per_s}: use a number above 0"
        )

    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(asyncio.run(run(args)))


if __name__ == "__main__":
    main()
