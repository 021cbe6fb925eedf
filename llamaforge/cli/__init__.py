"""The `llamaforge` command line: one small module per command, each parsing flags and calling the public API."""
