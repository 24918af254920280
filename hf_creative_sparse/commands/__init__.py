"""CLI subcommands; see hf_creative_sparse/cli.py."""
