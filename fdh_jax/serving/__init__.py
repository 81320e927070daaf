"""Serving a trained model: encoders restored from a workdir or loaded from an export, export,
hash indexes from the command line (`--mode=encode/search`) and `--mode=eval`."""
