"""Command-line tools behind `glm-kernels` subcommands."""
