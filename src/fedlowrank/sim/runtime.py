"""The in-process federated runtime: one model, many clients, every byte through the codec.

Round t (rounds numbered 1, 2, ...):

  1. sample clients (a count or a fraction, drawn from a seed derived from (seed, t));
  2. each sampled client that missed broadcasts since it last synced is first sent the full
     state or the missed broadcasts, whichever is fewer bytes (DESIGN.md section 2, rule 8);
  3. it trains locally from the synced state (plus its own local keys), builds its upload with
     `algorithm.client_payload` and encodes it; a client whose training raises is left out;
  4. the server decodes each upload against the expected shapes; one that fails to decode is
     left out of the round and logged, the others go on;
  5. the server builds the broadcast, encodes it, decodes the bytes once and applies that
     decoded payload to its state; every client that took part applies the same payload, so
     all stay bit-identical (with bf16 values too: nobody keeps pre-encoding tensors);
  6. every `eval_every` rounds (and after the last) the global state is evaluated, or, when the
     algorithm keeps local keys, each client's own state on its own test split.

Memory: the task holds the one model; per client the runtime keeps its last synced round and,
if the algorithm has local keys, those tensors. With `verify_sync` each client also keeps its
own copy of the sent keys, built only from the bytes it received, and the runtime checks it
against the server's state before every round (a self-test of the protocol).

Randomness comes only from seeds derived from (seed, purpose, round, client), so a run resumed
from a checkpoint repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from fedlowrank.algorithms.base import Algorithm, ClientInfo, RoundInfo, derive_seed, state_payload
from fedlowrank.codec import PayloadError, decode_payload, encode_payload, encode_payload_with_stats
from fedlowrank.config import ConfigError
from fedlowrank.lora import lora_pairs
from fedlowrank.payload import Payload
from fedlowrank.roundconfig import POSITIONS, SimConfig  # re-exported: the runtime's config
from fedlowrank.tasks.base import Task

__all__ = ["SimConfig", "Simulation", "Channel", "SimState", "keep_local", "encode", "Encoded"]

log = logging.getLogger("fedlowrank.sim")
State = dict[str, torch.Tensor]


@dataclass(frozen=True)
class Encoded:
    """A payload's wire bytes and its information bound (k value bits + log2 C(n, k), in bytes)."""

    data: bytes
    bound_bytes: float

    def __len__(self) -> int:
        return len(self.data)


def encode(payload: Payload, positions: str, value_dtype: str) -> Encoded:
    data, stats = encode_payload_with_stats(payload, positions, value_dtype)
    return Encoded(data, float(stats["bound_bytes"]))


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


class Channel:
    """Carries a client's upload bytes to the server. The default delivers them untouched;
    a test substitutes one that corrupts or truncates them."""

    def upload(self, round: int, client: int, data: bytes) -> bytes:
        return data


@dataclass
class SimState:
    """Everything a checkpoint holds: enough to continue after `round` exactly."""

    round: int
    global_state: State
    versions: np.ndarray  # (num_clients,) last round whose state each client holds
    local: dict[int, State] = field(default_factory=dict)  # the algorithm's local keys
    client_copies: dict[int, State] = field(default_factory=dict)  # verify_sync only
    history: list[tuple[int, bytes, float]] = field(default_factory=list)  # (round, bytes, bound)
    pruned: int = 0  # broadcasts up to this round were dropped: older clients get the full state
    totals: dict[str, float] = field(default_factory=dict)
    server_memory: State = field(default_factory=dict)  # Algorithm.server_step's memory
    client_memory: dict[int, State] = field(default_factory=dict)  # Algorithm.client_step's, per client

    def to_dict(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "global_state": self.global_state,
            "versions": torch.from_numpy(self.versions.copy()),
            "local": self.local,
            "client_copies": self.client_copies,
            "history": [(r, torch.frombuffer(bytearray(b), dtype=torch.uint8), q) for r, b, q in self.history],
            "pruned": self.pruned,
            "totals": self.totals,
            "server_memory": self.server_memory,
            "client_memory": self.client_memory,
        }

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> "SimState":
        return cls(
            round=int(d["round"]),
            global_state=dict(d["global_state"]),
            versions=d["versions"].numpy().astype(np.int64),
            local={int(k): dict(v) for k, v in d["local"].items()},
            client_copies={int(k): dict(v) for k, v in d["client_copies"].items()},
            history=[(int(r), t.numpy().tobytes(), float(q)) for r, t, q in d["history"]],
            pruned=int(d["pruned"]),
            totals={k: float(v) for k, v in d["totals"].items()},
            server_memory=dict(d.get("server_memory", {})),
            client_memory={int(k): dict(v) for k, v in d.get("client_memory", {}).items()},
        )


def _totals() -> dict[str, float]:
    keys = ("upload_bytes", "download_bytes", "upload_bound_bytes", "download_bound_bytes",
            "server_seconds", "train_seconds", "eval_seconds", "wall_seconds")  # fmt: skip
    return {k: 0.0 for k in keys}


class Simulation:
    """One federated run of `algorithm` on `task`. `run()` returns the per-round records.

    `on_round(record, state)` is called after each complete round (the run directory writes the
    metrics line and the checkpoint there); `channel` carries upload bytes (tests corrupt them).
    """

    def __init__(
        self,
        task: Task,
        algorithm: Algorithm,
        config: SimConfig,
        seed: int = 0,
        channel: Channel | None = None,
        on_round: Callable[[dict[str, Any], SimState], None] | None = None,
    ) -> None:
        self.task = task.build()
        self.alg = keep_local(algorithm, self.task.local_keys()) if self.task.local_keys() else algorithm
        self.cfg = config
        self.seed = int(seed)
        self.channel = channel or Channel()
        self.on_round = on_round
        init = self.alg.init_state(self.task.initial_state(), derive_seed(self.seed, "init_state"))
        self.state = SimState(0, init, np.zeros(self.task.num_clients, dtype=np.int64), totals=_totals())
        keys = list(init)
        self.sent = self.alg.sent_keys(init)
        self.local_keys = self.alg.local_keys(init)
        self.trainable = self.alg.trainable_keys(init)
        unknown = sorted(set(self.sent + self.local_keys + self.trainable) - set(keys))
        if unknown:
            raise ValueError(f"algorithm {self.alg.name!r} names keys the task does not have: {unknown[:5]}")
        if any("lora_A" in k for k in keys):
            try:
                lora_pairs(init)
            except ValueError as e:  # e.g. LoRA on a convolution: every client would fail every round
                raise ConfigError(f"task {self.task.name!r}: {e}; LoRA algorithms need linear layers") from None
        self.upload_shapes = self.alg.upload_shapes(init)
        self.sent_shapes = {k: tuple(init[k].shape) for k in self.sent}
        self._initial_sent = {k: init[k].clone() for k in self.sent}
        self.personal = config.evaluation == "clients" or (config.evaluation == "auto" and bool(self.local_keys))
        if self.personal and not self.task.has_client_tests():
            raise ValueError(f"task {self.task.name!r} has no per-client test splits for evaluation = 'clients'")
        self.threads = config.threads or self.task.default_threads
        # Upper bound on a full-state download: catch-up histories that already cost more can be
        # dropped, since such a client is sent the full state instead. Dense fp32 records, plus
        # bitmap-sized position bits unless positions are "auto" or "dense" (golomb <= bitmap).
        cap = len(encode_payload(state_payload(init, self.sent, 0), "dense", "fp32")) + 32
        if config.download_positions not in ("auto", "dense"):
            cap += sum((init[k].numel() + 7) // 8 + 16 for k in self.sent)
        self._full_state_cap = cap

    # --- the pieces of a round ----------------------------------------------------------------
    def sample(self, round: int) -> list[int]:
        n = self.task.num_clients
        m = self.cfg.clients_per_round or max(1, round_half_up(self.cfg.fraction * n))
        m = min(m, n)
        rng = np.random.default_rng(derive_seed(self.seed, "sample", round))
        return sorted(int(i) for i in rng.choice(n, size=m, replace=False))

    def _full_state(self, round: int) -> tuple[Payload, Encoded]:
        payload = state_payload(self.state.global_state, self.sent, round)
        return payload, encode(payload, self.cfg.download_positions, "fp32")  # fp32: exact values

    def _catch_up(self, client: int, round: int, cache: dict) -> tuple[int, float, str]:
        """Bring `client` to round - 1. Returns (bytes sent, bound bytes, what was sent)."""
        st = self.state
        v = int(st.versions[client])
        st.versions[client] = round - 1
        missed = [(b, q) for r, b, q in st.history if v < r <= round - 1]
        lost = v < st.pruned  # some broadcasts it missed are gone: they cost more than the state
        if not missed and not lost:
            return 0, 0.0, "none"
        deltas = sum(len(b) for b, _ in missed)
        if lost or len(missed) > 1:
            if "full" not in cache:
                cache["full"] = self._full_state(round - 1)
            payload, full = cache["full"]
            if lost or len(full) < deltas:
                if self.cfg.verify_sync:
                    self._client_apply(client, decode_payload(full.data, self.sent_shapes))
                return len(full), full.bound_bytes, "state"
        if self.cfg.verify_sync:
            for b, _ in missed:
                self._client_apply(client, decode_payload(b))
        return deltas, sum(q for _, q in missed), "deltas"

    def _client_apply(self, client: int, broadcast: Payload) -> None:
        copies = self.state.client_copies
        base = copies.get(client) or self._initial_sent
        copies[client] = {k: v for k, v in self.alg.apply_broadcast(base, broadcast).items() if k in self.sent}

    def _client_start(self, client: int) -> State:
        st = self.state
        start = dict(st.global_state)
        if self.cfg.verify_sync:
            mine = st.client_copies.get(client) or {k: self._initial_sent[k] for k in self.sent}
            for k in self.sent:
                if not torch.equal(mine[k], st.global_state[k]):
                    raise AssertionError(f"client {client} is out of sync with the server on {k!r}")
            start.update(mine)
        start.update(st.local.get(client, {}))
        return start

    def _train_client(self, client: int, round: int, start: State, memory: State) -> tuple[Payload, State, dict, State]:
        """Train `client` from `start`; (upload, trained state, stats, the client's new memory)."""
        task, alg = self.task, self.alg
        task.load(start)
        t0 = time.perf_counter()
        stats = task.train(
            client,
            self.trainable,
            lambda params: alg.regularizer(params, start),
            seed=derive_seed(self.seed, "train", round, client),
        )
        trained = task.state()
        payload, memory = alg.client_step(start, trained, ClientInfo(round, client, self.seed), memory)
        stats["train_seconds"] = time.perf_counter() - t0
        stats.update(payload.stats)
        return payload, trained, stats, memory

    def evaluate(self) -> dict[str, float]:
        task, st = self.task, self.state
        if not self.personal:
            task.load(st.global_state)
            return task.evaluate(None)
        acc = loss = n = 0.0
        for i in range(task.num_clients):
            task.load({**st.global_state, **st.local.get(i, {})})
            r = task.evaluate(i)
            if r["samples"]:
                acc += r["accuracy"] * r["samples"]
                loss += r["loss"] * r["samples"]
                n += r["samples"]
        return {"accuracy": acc / n, "loss": loss / n, "samples": int(n), "clients": task.num_clients}

    # --- one round ----------------------------------------------------------------------------
    def round(self, t: int) -> dict[str, Any]:
        st, cfg = self.state, self.cfg
        wall0 = time.perf_counter()
        clients = self.sample(t)
        records: list[dict[str, Any]] = []
        uploads: list[Payload] = []
        weights: list[int] = []
        accepted: list[int] = []
        server_s = 0.0
        cache: dict = {}
        for i in clients:
            rec: dict[str, Any] = {"client": i, "status": "ok"}
            records.append(rec)
            t0 = time.perf_counter()
            rec["download_bytes"], rec["download_bound_bytes"], rec["catchup"] = self._catch_up(i, t, cache)
            server_s += time.perf_counter() - t0
            rec["upload_bytes"], rec["upload_bound_bytes"] = 0, 0.0
            start = self._client_start(i)
            try:
                payload, trained, stats, memory = self._train_client(i, t, start, st.client_memory.get(i, {}))
                t0 = time.perf_counter()
                enc = encode(payload, cfg.upload_positions, cfg.upload_dtype)
                stats["encode_seconds"] = time.perf_counter() - t0
            except Exception as e:  # noqa: BLE001 - a client's failure must not stop the round
                rec.update(status="failed", reason=f"training failed: {type(e).__name__}: {e}")
                log.warning("round %d: client %d left out: %s", t, i, rec["reason"])
                continue
            rec.update(train_loss=stats["loss"], train_seconds=stats["train_seconds"],
                       encode_seconds=stats["encode_seconds"], num_samples=self.task.num_samples(i))  # fmt: skip
            rec.update(client_diagnostics(stats))
            if memory:
                st.client_memory[i] = memory
            else:  # an algorithm that keeps nothing (or no longer anything) for this client
                st.client_memory.pop(i, None)
            if self.local_keys:
                st.local[i] = {k: trained[k] for k in self.local_keys}
            data = self.channel.upload(t, i, enc.data)
            rec["upload_bytes"], rec["upload_bound_bytes"] = len(data), enc.bound_bytes
            got, seconds = self._accept_upload(t, rec, data)
            server_s += seconds
            if got is None:
                continue
            uploads.append(got)
            weights.append(self.task.num_samples(i))
            accepted.append(i)

        broadcast_bytes, diagnostics = 0, {}
        if uploads:
            enc, decoded, seconds, diagnostics = self._aggregate(t, uploads, weights)
            server_s += seconds
            broadcast_bytes = len(enc.data)
            for rec in records:
                if rec["client"] in accepted:
                    rec["download_bytes"] += len(enc.data)
                    rec["download_bound_bytes"] += enc.bound_bytes
                    st.versions[rec["client"]] = t
                    if cfg.verify_sync:
                        self._client_apply(rec["client"], decoded)
        else:
            log.warning("round %d: no upload accepted; the global state is unchanged", t)
        self._prune_history()
        return self._finish_round(t, clients, records, accepted, broadcast_bytes, server_s, wall0, diagnostics)

    def _accept_upload(self, t: int, rec: dict[str, Any], data: bytes) -> tuple[Payload | None, float]:
        """Decode one client's upload bytes against the expected shapes; (None, seconds) and a
        logged reason in `rec` when they are malformed or stamped for another round."""
        t0 = time.perf_counter()
        try:
            got = decode_payload(data, self.upload_shapes)
            if "round" in got.meta and got.meta["round"] != t:
                raise PayloadError(f"upload is for round {got.meta['round']}, this is round {t}")
        except PayloadError as e:
            rec.update(status="rejected", reason=f"upload rejected: {e}")
            log.warning("round %d: client %d left out: %s", t, rec["client"], rec["reason"])
            got = None
        return got, time.perf_counter() - t0

    def _aggregate(self, t: int, uploads: list[Payload], weights: list[int]) -> tuple[Encoded, Payload, float, dict]:
        """Build, encode and decode round t's broadcast, and apply the decoded payload (what
        every client applies too) to the global state; returns (encoded, decoded, seconds,
        the server's diagnostics)."""
        st, cfg, alg = self.state, self.cfg, self.alg
        t0 = time.perf_counter()
        bc, st.server_memory = alg.server_step(st.global_state, uploads, weights, RoundInfo(t, self.seed), st.server_memory)
        enc = encode(bc, cfg.download_positions, cfg.download_dtype)
        shapes = {k: tuple(st.global_state[k].shape) for k in bc.tensors}
        decoded = decode_payload(enc.data, shapes)  # decoded once; everyone applies this
        st.global_state = alg.apply_broadcast(st.global_state, decoded)
        st.history.append((t, enc.data, enc.bound_bytes))
        return enc, decoded, time.perf_counter() - t0, {**bc.stats, **factor_norms(st.global_state)}

    def _finish_round(
        self, t, clients, records, accepted, broadcast_bytes, server_s, wall0, diagnostics, **extra: Any
    ) -> dict[str, Any]:
        """The round's ledger record (evaluating when due); updates the running totals."""
        st, cfg = self.state, self.cfg
        out: dict[str, Any] = {
            "round": t,
            "clients": clients,
            "accepted": len(accepted),
            "dropped": [{"client": r["client"], "reason": r["reason"]} for r in records if r["status"] != "ok"],
            "upload_bytes": sum(r["upload_bytes"] for r in records),
            "download_bytes": sum(r["download_bytes"] for r in records),
            "upload_bound_bytes": sum(r["upload_bound_bytes"] for r in records),
            "download_bound_bytes": sum(r["download_bound_bytes"] for r in records),
            "broadcast_bytes": broadcast_bytes,
            "server_seconds": server_s,
            "train_seconds": sum(r.get("train_seconds", 0.0) for r in records),
            **extra,
        }
        kept = [r["upload_kept_energy"] for r in records if "upload_kept_energy" in r]
        if kept:
            diagnostics = {**diagnostics, "upload_kept_energy": sum(kept) / len(kept)}
        if diagnostics:
            out["diagnostics"] = diagnostics
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            t0 = time.perf_counter()
            out["eval"] = self.evaluate()
            out["eval_seconds"] = time.perf_counter() - t0
        out["wall_seconds"] = time.perf_counter() - wall0
        tot = st.totals
        for k in tot:
            tot[k] += float(out.get(k, 0.0))
        out["cum_upload_bytes"] = int(tot["upload_bytes"])
        out["cum_download_bytes"] = int(tot["download_bytes"])
        out["per_client"] = records
        st.round = t
        return out

    def _prune_history(self) -> None:
        """Drop broadcasts no client can need: those older than every client's round, and
        those behind newer ones that together already cost more than any full state (a client
        missing them is sent the state instead)."""
        st = self.state
        oldest = int(st.versions.min())
        hist = [h for h in st.history if h[0] > oldest]
        tail = 0
        for j in range(len(hist) - 1, 0, -1):
            tail += len(hist[j][1])
            if tail >= self._full_state_cap:
                st.pruned = max(st.pruned, hist[j - 1][0])
                hist = hist[j:]
                break
        st.history = hist

    # --- the whole run ------------------------------------------------------------------------
    def run(self, resume_from: SimState | None = None) -> list[dict[str, Any]]:
        if resume_from is not None:
            self.state = resume_from
        out = []
        before = torch.get_num_threads()
        if self.threads:
            torch.set_num_threads(self.threads)
        try:
            for t in range(self.state.round + 1, self.cfg.rounds + 1):
                rec = self.round(t)
                out.append(rec)
                if self.on_round is not None:
                    self.on_round(rec, self.state)
        finally:
            torch.set_num_threads(before)
        return out


CLIENT_DIAGNOSTICS = ("upload_kept_energy",)


def client_diagnostics(stats: Mapping[str, Any]) -> dict[str, float]:
    """The diagnostics a client's upload reported (Payload.stats), for its round record."""
    return {k: float(stats[k]) for k in CLIENT_DIAGNOSTICS if k in stats}


def factor_norms(state: Mapping[str, torch.Tensor]) -> dict[str, float]:
    """Max over LoRA modules of ||B|| and ||A|| after the round (empty for non-LoRA states)."""
    pairs = lora_pairs(state)
    if not pairs:
        return {}
    b = max(float(torch.linalg.matrix_norm(state[bk].double())) for bk, _ in pairs.values())
    a = max(float(torch.linalg.matrix_norm(state[ak].double())) for _, ak in pairs.values())
    return {"B_norm_after_max": b, "A_norm_after_max": a}


def round_half_up(x: float) -> int:
    return int(np.floor(x + 0.5))
