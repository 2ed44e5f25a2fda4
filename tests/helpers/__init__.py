"""Helpers shared by several test modules (plain functions and constants, no tests and no fixtures).

A test module never imports another test module: what two of them share lives here, in ``tests/factories.py``
(database rows) or in the lab package ``omalab`` (the real parts).
"""
