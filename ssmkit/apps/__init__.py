"""The `ssmkit` command and the shared training runner."""
