"""The round protocol, written once for both runtimes (in-process and Flower).

* `server.py`: `RoundServer`, the server side of a round: sample, plan each client's catch-up,
  accept and validate uploads, aggregate, record the ledger, evaluate.
* `client.py`: `ClientWorker`, the client side: sync from the bytes it was sent, train, build
  and encode the upload, apply a broadcast, evaluate its own model.
* `transport.py`: the `Transport` interface between the two sides, and `InProcessTransport`
  (plain calls). The Flower transport is `fedlowrank.flower.transport`.
* `messages.py`: what travels (`TrainOrder`, `TrainResult`, `EvalResult`) and the typed
  per-client ledger record (`ClientRound`).
* `state.py`: what is kept: `SimState` (the server's checkpoint) and `ClientHeld` (one
  client's private state: synced keys, local keys, the algorithm's client memory).
* `setup.py`: `RunSetup`, the keys and shapes both sides derive from the task and algorithm.
"""

from fedlowrank.protocol.client import ClientWorker
from fedlowrank.protocol.messages import ClientRound, Encoded, EvalResult, TrainOrder, TrainResult, encode
from fedlowrank.protocol.server import RoundServer
from fedlowrank.protocol.setup import RunSetup, keep_local
from fedlowrank.protocol.state import ClientHeld, SimState
from fedlowrank.protocol.transport import Channel, InProcessTransport, Transport

__all__ = ["ClientWorker", "ClientRound", "Encoded", "EvalResult", "TrainOrder", "TrainResult", "encode",
           "RoundServer", "RunSetup", "keep_local", "ClientHeld", "SimState", "Channel", "InProcessTransport",
           "Transport"]  # fmt: skip
