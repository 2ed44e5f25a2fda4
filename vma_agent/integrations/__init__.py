"""Integrations with external programs and libraries (libnbd, nbdkit); the only place they are touched."""
