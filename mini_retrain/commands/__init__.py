"""One module per subcommand of `mini_retrain` (the argparse side is mini_retrain/cli.py):

    retrain.py   retrain.py itself          label.py    label_image
    crossval.py  K-fold cross-validation    sweep.py    a grid of settings, chosen on validation
    demo.py      the bundled demo           prepare.py  NLM downloads -> class folders
    progress.py  the one-line training progress shown on a terminal
"""
