"""The pure core: rules and encodings with no I/O.

Nothing in this package may import trio, libp2p, plyvel, ollama, pynvml or any
other I/O library (the import-linter contract in pyproject.toml checks it).
Every function that depends on time takes ``now_ms`` as a parameter.
"""
