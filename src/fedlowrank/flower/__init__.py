"""The Flower runtime: the same algorithms, tasks and codec as a Flower app (docs/flower.md).

`fedlowrank.flower.server_app:app` is the ServerApp and `fedlowrank.flower.client_app:app` the
ClientApp; pyproject.toml's `[tool.flwr.app]` names them, so `flwr run .` runs the project.
Importing this package does not import Flower; its modules do.
"""
