"""p2pgpu: a peer-to-peer marketplace for LLM inference on idle GPUs.

Layout (see docs/architecture.md):

- ``p2pgpu.core``: the pure core. Wire codec, identity, genesis, ledger rules,
  offers, ranking and job sessions. No I/O imports (enforced by import-linter);
  time is always a parameter.
- Edges beside it adapt I/O to the core and hold no rules of their own:
  ``p2pgpu.net`` (libp2p), ``p2pgpu.replication`` (ledger gossip and sync),
  ``p2pgpu.jobrunner`` (job streams), ``p2pgpu.executor`` (Ollama),
  ``p2pgpu.gpu`` (NVML), ``p2pgpu.store`` (LevelDB), ``p2pgpu.datadir``
  (files on disk), ``p2pgpu.api``/``p2pgpu.api_client`` (the local HTTP
  API), ``p2pgpu.node`` (the daemon wiring them), ``p2pgpu.cli`` (click).
- ``p2pgpu.testing``: helpers shipped with the package, as ``trio.testing`` is.
"""

__version__ = "0.1.0"
