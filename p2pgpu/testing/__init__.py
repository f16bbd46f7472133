"""Test helpers shipped with the package (like ``trio.testing``).

The scripts in ``scripts/`` and the test suite both use them: factories for
keys and ledger entries and Hypothesis strategies (``ledger``), the Ollama
stand-in server (``ollama_standin``), a fake node behind the local API
(``fake_view``), waiting on conditions (``waiting``), node processes and
the local network (``devnet``, ``devnet_cli``, ``netns``), and the
deterministic simulator (``sim``).
"""
