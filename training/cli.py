"""`lungnode train ...`: the ML engineer's commands. Each training module adds its own subcommand."""
from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help="make data, train, evaluate and export detection models")
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="COMMAND")
    from lungnode.training import eval_run, export, fit, promote, synth
    from lungnode.training.importers import command as importers

    for module in (importers, synth, fit, eval_run, export, promote):
        module.add_command(tsub)
