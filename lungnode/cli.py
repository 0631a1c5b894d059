"""The `lungnode` console command."""
from __future__ import annotations

import argparse
import logging
import sys


def _cmd_config(args: argparse.Namespace) -> int:
    from lungnode.config import dump_yaml, get_settings

    sys.stdout.write(dump_yaml(get_settings()))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from lungnode.api import create_app
    from lungnode.config import get_settings
    from lungnode.node import Node

    settings = get_settings()
    node = Node(settings)
    node.start()
    logging.getLogger("lungnode").info(
        "lungnode ready: DICOM %s on port %d, web on http://%s:%d, results to %s",
        settings.ae_title, settings.dicom_port, settings.http_host, settings.http_port,
        settings.pacs or "(no PACS configured: set LUNGNODE_PACS)")
    try:
        uvicorn.run(create_app(node), host=settings.http_host, port=settings.http_port, log_level="warning")
    finally:
        node.stop()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lungnode", description="AI lung-nodule detection beside the PACS.")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the DICOM node (SCP, processing, delivery) and its web API")
    p.set_defaults(func=_cmd_serve)

    p = sub.add_parser("config", help="print the effective settings (YAML + environment)")
    p.set_defaults(func=_cmd_config)

    from lungnode.models.bundle_import import add_command as register_models
    from lungnode.training.cli import register as register_train

    register_train(sub)
    register_models(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
