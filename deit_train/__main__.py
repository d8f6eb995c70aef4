"""`python -m deit_train ...` is `deit-train ...` (cli.py). The run itself is train.main, imported from its module, so
that launchers that pickle it (submitit, joblib) pickle a reference to an importable function."""

from deit_train.cli import cli

if __name__ == "__main__":
    cli()
