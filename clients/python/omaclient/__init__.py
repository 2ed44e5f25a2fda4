"""Typed Python client and the omactl CLI for the OMA server."""
