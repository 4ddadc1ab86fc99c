"""The in-process federated runtime (the default): clients, rounds, the byte ledger,
checkpoints and run directories. See `fedlowrank.sim.runtime` for the round protocol."""

from fedlowrank.sim.runtime import Channel, SimConfig, SimState, Simulation

__all__ = ["Channel", "Simulation", "SimConfig", "SimState"]
