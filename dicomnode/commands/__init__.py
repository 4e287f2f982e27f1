"""CLI command groups, one module each; `common` holds the shared options and output."""
