"""Every command's flags and the checks they allow without torch, Ray or MLflow: a CLI parses and
checks here first, so that `--help` and a bad flag answer in a tenth of a second (benchmarks/startup.py),
and only then imports the module that does the work (blockdrop.cli)."""
