"""`RunSetup`: what both sides of the round protocol derive from (task, algorithm, seed): the
initial state, which keys are trained, sent and kept local, and the shapes a valid upload has."""

from __future__ import annotations

from dataclasses import dataclass

from fedlowrank.algorithms.base import Algorithm
from fedlowrank.config import ConfigError
from fedlowrank.lora import lora_pairs
from fedlowrank.protocol.state import State
from fedlowrank.seeds import derive_seed
from fedlowrank.tasks.base import Task

__all__ = ["RunSetup", "keep_local"]


def keep_local(algorithm: Algorithm, keys: list[str]) -> Algorithm:
    """`algorithm` with `keys` kept on the clients as well: never sent, persisted per client.

    For keys a *model* declares local whatever the algorithm (pFedPara's W2 factors): FedAvg on a
    pFedPara model is pFedPara. Every method of the algorithm sees the extended `local_keys`, so
    its uploads, broadcasts and expected shapes leave those keys out.
    """
    base = type(algorithm)
    extra = frozenset(keys)

    def local_keys(self, state):
        own = set(base.local_keys(self, state))
        return [k for k in state if k in extra or k in own]

    cls = type(f"{base.__name__}KeepLocal", (base,), {"local_keys": local_keys, "__doc__": base.__doc__})
    out = cls.__new__(cls)
    out.__dict__.update(algorithm.__dict__)
    return out


@dataclass(frozen=True)
class RunSetup:
    """The algorithm (with the model's local keys), the initial global state, and its key sets."""

    alg: Algorithm
    init: State
    sent: list[str]
    local_keys: list[str]
    trainable: list[str]
    upload_shapes: dict[str, tuple[int, ...]]
    sent_shapes: dict[str, tuple[int, ...]]

    @classmethod
    def of(cls, task: Task, algorithm: Algorithm, seed: int) -> "RunSetup":
        """For a built `task`; raises ValueError / ConfigError for an algorithm the task cannot run."""
        alg = keep_local(algorithm, task.local_keys()) if task.local_keys() else algorithm
        init = alg.init_state(task.initial_state(), derive_seed(int(seed), "init_state"))
        sent, local, trainable = alg.sent_keys(init), alg.local_keys(init), alg.trainable_keys(init)
        unknown = sorted(set(sent + local + trainable) - set(init))
        if unknown:
            raise ValueError(f"algorithm {alg.name!r} names keys the task does not have: {unknown[:5]}")
        if any("lora_A" in k for k in init):
            try:
                lora_pairs(init)
            except ValueError as e:  # e.g. LoRA on a convolution: every client would fail every round
                raise ConfigError(f"task {task.name!r}: {e}; LoRA algorithms need linear layers") from None
        return cls(alg, init, sent, local, trainable, alg.upload_shapes(init), {k: tuple(init[k].shape) for k in sent})

    def initial_sent(self) -> State:
        return {k: self.init[k].clone() for k in self.sent}
