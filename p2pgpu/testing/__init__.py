"""Test helpers shipped with the package (like ``trio.testing``).

The scripts in ``scripts/`` and the test suite both use them: factories for
keys and ledger entries, Hypothesis strategies, and the Ollama stand-in server.
"""
