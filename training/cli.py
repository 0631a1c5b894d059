"""`lungnode train ...`: the ML engineer's commands. Each training module adds its own subcommand."""
from __future__ import annotations

import argparse

TRAIN_HELP = "make data, train, evaluate, register the reference set and promote detection models"


def register(sub: argparse._SubParsersAction) -> None:
    train = sub.add_parser("train", help=TRAIN_HELP)
    tsub = train.add_subparsers(dest="train_command", required=True, metavar="COMMAND")
    from lungnode.training import (candidate_mining, eval_run, export, fit, lidc_shapes, pipeline, promote, quantize,
                                   reference_set, rescorer_attach, rescorer_fit, retune, synth)
    from lungnode.training.importers import command as importers

    for module in (importers, synth, lidc_shapes, fit, candidate_mining, rescorer_fit, eval_run, export, rescorer_attach, retune,
                   quantize, reference_set, promote, pipeline):
        module.add_command(tsub)
