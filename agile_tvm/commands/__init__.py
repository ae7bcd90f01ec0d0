"""CLI subcommands: each module here defines `register(subparsers)`; `agile_tvm.cli` discovers them."""
