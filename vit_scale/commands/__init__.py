"""The command layer: every `vit-scale` subcommand parses its arguments, builds, and calls the library."""
