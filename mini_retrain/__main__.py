"""`python -m mini_retrain` is the same as the `mini_retrain` command."""

from mini_retrain.cli import main

raise SystemExit(main())
