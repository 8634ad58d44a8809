"""Subcommands of the oci-pull-through console script beyond healthcheck (SPEC §13)."""
