"""The server side of the round protocol, for every transport.

Round t (rounds numbered 1, 2, ...):

  1. sample clients (a count or a fraction, drawn from a seed derived from (seed, t)); the
     transport says which of them cannot be reached (a lost SuperNode): those are left out;
  2. each sampled client that missed broadcasts since it last synced is sent the full state or
     the missed broadcasts, whichever is fewer bytes (rule 8 of docs/runtime.md), in its order;
  3. the transport has each client sync from those bytes, train from the synced state (plus
     its own local keys), build its upload with `algorithm.client_step` and encode it; a client
     whose training fails, or that does not answer, is left out and logged;
  4. the server decodes each upload against the expected shapes; one that fails to decode or
     is stamped for another round is left out of the round and logged, the others go on;
  5. the server builds the broadcast, encodes it, decodes the bytes once and applies that
     decoded payload to its state; the transport sends the same bytes to every accepted client,
     and only those that applied them count as synced (with bf16 values too: nobody keeps
     pre-encoding tensors);
  6. every `eval_every` rounds (and after the last) the global state is evaluated on the server,
     or, when the algorithm keeps local keys, each client evaluates its own model on its own
     test split (through the transport).

Randomness comes only from seeds derived from (seed, purpose, round, client), so a run resumed
from a checkpoint repeats an uninterrupted one exactly.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from fedlowrank.algorithms.aggregation import aggregate_encoded
from fedlowrank.algorithms.base import Algorithm, RoundInfo, state_payload
from fedlowrank.codec import DecodeBuffers, PayloadError, decode_payload, encode_payload
from fedlowrank.lora import lora_pairs
from fedlowrank.payload import Payload
from fedlowrank.protocol.messages import ClientRound, Encoded, EvalResult, TrainOrder, encode
from fedlowrank.protocol.setup import RunSetup
from fedlowrank.protocol.state import SimState
from fedlowrank.protocol.transport import Transport
from fedlowrank.roundconfig import SimConfig
from fedlowrank.seeds import derive_seed
from fedlowrank.tasks.base import Task

__all__ = ["RoundServer", "factor_norms", "round_half_up"]

log = logging.getLogger("fedlowrank.sim")  # the run directory's events.log listens here
TOTALS = ("upload_bytes", "download_bytes", "upload_bound_bytes", "download_bound_bytes",
          "server_seconds", "train_seconds", "eval_seconds", "wall_seconds")  # fmt: skip


class RoundServer:
    """One federated run of `algorithm` on `task`, its clients reached through the transport
    `transport(server)` builds. `run()` returns the per-round records.

    `on_round(record, state)` is called after each complete round (the run directory writes the
    metrics line and the checkpoint there).
    """

    def __init__(
        self,
        task: Task,
        algorithm: Algorithm,
        config: SimConfig,
        seed: int,
        transport: Callable[["RoundServer"], Transport],
        on_round: Callable[[dict[str, Any], SimState], None] | None = None,
    ) -> None:
        self.task = task.build()
        self.cfg = config
        self.seed = int(seed)
        self.on_round = on_round
        self.setup = setup = RunSetup.of(self.task, algorithm, self.seed)
        self.alg, self.sent, self.local_keys, self.trainable = setup.alg, setup.sent, setup.local_keys, setup.trainable
        self.upload_shapes, self.sent_shapes = setup.upload_shapes, setup.sent_shapes
        init = setup.init
        self.state = SimState(0, init, np.zeros(self.task.num_clients, dtype=np.int64), totals=dict.fromkeys(TOTALS, 0.0))
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
        self.transport = transport(self)

    # --- the pieces of a round ----------------------------------------------------------------
    def sample(self, round: int) -> list[int]:
        n = self.task.num_clients
        m = self.cfg.clients_per_round or max(1, round_half_up(self.cfg.fraction * n))
        m = min(m, n)
        rng = np.random.default_rng(derive_seed(self.seed, "sample", round))
        return sorted(int(i) for i in rng.choice(n, size=m, replace=False))

    def _full_state(self, round: int) -> Encoded:
        payload = state_payload(self.state.global_state, self.sent, round)
        return encode(payload, self.cfg.download_positions, "fp32")  # fp32: exact values

    def order(self, client: int, round: int, cache: dict, commit: bool = True) -> TrainOrder:
        """What brings `client` to round - 1: nothing, the missed broadcasts or the full state,
        whichever is fewer bytes. With `commit` the ledger counts the client as synced to round - 1."""
        st = self.state
        v = int(st.versions[client])
        if commit:
            st.versions[client] = round - 1
        missed = [(r, b, q) for r, b, q in st.history if v < r <= round - 1]
        lost = v < 0 or v < st.pruned  # unknown, or it missed broadcasts that are gone
        if not missed and not lost:
            return TrainOrder(round, client, v, "none")
        deltas = sum(len(b) for _, b, _ in missed)
        if lost or len(missed) > 1:
            if "full" not in cache:
                cache["full"] = self._full_state(round - 1)
            full = cache["full"]
            if lost or len(full) < deltas:
                return TrainOrder(round, client, v, "state", (), (full.data,), full.bound_bytes)
        rounds, data, bounds = zip(*missed)
        return TrainOrder(round, client, v, "deltas", tuple(rounds), tuple(data), float(sum(bounds)))

    def evaluate(self, round: int | None = None) -> dict[str, float]:
        """The global state on the server's evaluation set, or (per-client evaluation) each
        client's own model on its own test split, weighted by test samples."""
        task, st = self.task, self.state
        if not self.personal:
            task.load(st.global_state)
            return task.evaluate(None)
        t = st.round if round is None else round
        cache: dict = {}
        got = self.transport.evaluate(t, list(range(task.num_clients)), lambda i: self.order(i, t + 1, cache, commit=False))
        return aggregate_evaluations(list(got.values()))

    # --- one round ----------------------------------------------------------------------------
    def round(self, t: int) -> dict[str, Any]:
        st = self.state
        wall0 = time.perf_counter()
        clients = self.sample(t)
        unreachable, holds = self.transport.connect(t, clients)
        for i, v in holds.items():  # a (re)joined client holds less than the ledger thought
            st.versions[i] = min(int(st.versions[i]), v)
        records = {i: ClientRound(i) for i in clients}
        orders: list[TrainOrder] = []
        server_s, cache = 0.0, {}
        for i in clients:
            if i in unreachable:
                self._leave_out(t, records[i], "failed", unreachable[i])
                continue
            t0 = time.perf_counter()
            order = self.order(i, t, cache)
            server_s += time.perf_counter() - t0
            records[i].download_bytes, records[i].download_bound_bytes = order.download_bytes, order.bound_bytes
            records[i].catchup = order.catchup
            orders.append(order)

        results = self.transport.train(t, orders)
        uploads: list[_Upload] = []
        checks = DecodeBuffers()  # one upload's dense tensors, reused: each is let go once checked
        for order in orders:  # in client order, whatever order the results came in
            i, rec, res = order.client, records[order.client], results.get(order.client)
            if res is not None:
                rec.node_id = res.node_id
            if res is None or res.error:
                st.versions[i] = order.base if res is None else res.holds
                self._leave_out(t, rec, "failed", "no result" if res is None else res.error)
                continue
            rec.trained(res)
            known = self.task.num_samples(i)  # the weight is what the server knows, never a claim
            if res.num_samples != known:
                self._leave_out(t, rec, "rejected", f"claims {res.num_samples} training samples; its partition has {known}")
                continue
            norm, seconds = self._accept_upload(t, rec, res.upload, checks)
            server_s += seconds
            if norm is not None:
                uploads.append(_Upload(i, known, res.upload, norm))
        del checks

        broadcast_bytes, diagnostics, enc = 0, {}, None
        t0 = time.perf_counter()
        uploads = self._bound_influence(t, records, uploads)
        while uploads:
            try:
                enc, diagnostics = self._aggregate(t, uploads)
                break
            except Exception as e:  # noqa: BLE001 - no upload may stop the run: blame the largest one
                j = max(range(len(uploads)), key=lambda j: uploads[j].norm * uploads[j].scale)
                self._leave_out(t, records[uploads[j].client], "rejected", f"the server step failed with this upload "
                                f"(the round's largest): {type(e).__name__}: {str(e)[:200]}")  # fmt: skip
                del uploads[j]
        accepted = [u.client for u in uploads]
        server_s += time.perf_counter() - t0
        if enc is not None:
            broadcast_bytes = len(enc.data)
            missed = self.transport.broadcast(t, enc.data, accepted)
            for i in accepted:
                if i in missed:
                    log.warning("round %d: client %d did not apply the broadcast: %s", t, i, missed[i])
                    continue
                records[i].download_bytes += len(enc.data)
                records[i].download_bound_bytes += enc.bound_bytes
                st.versions[i] = t
        else:
            log.warning("round %d: no upload accepted; the global state is unchanged", t)
        self._prune_history()
        return self._finish_round(t, clients, [records[i] for i in clients], accepted, broadcast_bytes, server_s,
                                  wall0, diagnostics)  # fmt: skip

    def _leave_out(self, t: int, rec: ClientRound, status: str, reason: str) -> None:
        if rec.node_id is not None and not reason.startswith("node "):
            reason = f"node {rec.node_id} (partition {rec.client}): {reason}"
        rec.fail(status, reason)
        log.warning("round %d: client %d left out: %s", t, rec.client, reason)

    def _decode(self, data: bytes, buffers: DecodeBuffers | None = None) -> Payload:
        return decode_payload(data, self.upload_shapes, buffers=buffers)

    def _accept_upload(self, t: int, rec: ClientRound, data: bytes,
                       buffers: DecodeBuffers | None = None) -> tuple[float | None, float]:  # fmt: skip
        """Check one client's upload bytes against the expected shapes, its stamp and its values;
        (its norm, seconds), or (None, seconds) and a logged reason in `rec` when they are malformed
        or stamped for another round. The decoded tensors are let go: the bytes are kept, and
        decoded again one upload at a time when the round is aggregated."""
        t0 = time.perf_counter()
        norm = None
        try:
            got = self._decode(data, buffers)  # nothing of it is kept
            stamp = (got.meta.get("round"), got.meta.get("client"))
            if stamp != (t, rec.client):  # a replay of old bytes, or another client's
                raise PayloadError(f"upload is stamped round {stamp[0]}, client {stamp[1]}; this is round {t}, "
                                   f"client {rec.client}")  # fmt: skip
            bad = [k for k, v in got.tensors.items() if not bool(torch.isfinite(v).all())]
            if bad:
                raise PayloadError(f"non-finite values in {bad[:3]}")
            norm = upload_norm(got)
        except PayloadError as e:
            self._leave_out(t, rec, "rejected", f"upload rejected: {e}")
        return norm, time.perf_counter() - t0

    def _bound_influence(self, t, records, uploads: list["_Upload"]) -> list["_Upload"]:
        """`sim.outlier_ratio`: with 3 or more uploads, one whose norm exceeds the ratio times
        the round's median norm is rejected (`outliers = "reject"`) or scaled down to that bound."""
        ratio = self.cfg.outlier_ratio
        if not ratio or len(uploads) < 3:
            return uploads
        bound = ratio * float(np.median([u.norm for u in uploads]))
        keep = []
        for u in uploads:
            if u.norm <= bound:
                keep.append(u)
            elif self.cfg.outliers == "clip":
                u.scale = bound / u.norm
                records[u.client].diagnostics["clipped_by"] = u.scale
                log.warning("round %d: client %d's update norm %.3g is above %g x the median (%.3g): scaled by %.3g",
                            t, u.client, u.norm, ratio, bound / ratio, u.scale)  # fmt: skip
                keep.append(u)
            else:
                self._leave_out(t, records[u.client], "rejected", f"update norm {u.norm:.3g} is above {ratio:g} x the "
                                f"round's median ({bound / ratio:.3g}); sim.outlier_ratio bounds it")  # fmt: skip
        return keep

    def _aggregate(self, t: int, uploads: list["_Upload"]) -> tuple[Encoded, dict]:
        """Build, encode and decode round t's broadcast, and apply the decoded payload (what
        every client applies too) to the global state; returns (encoded, the server's
        diagnostics). The uploads are decoded and fed to the algorithm's aggregator one at a
        time. Nothing changes unless it all succeeds with finite values (else it raises)."""
        st, cfg, alg = self.state, self.cfg, self.alg
        agg = alg.aggregator(st.global_state, [u.weight for u in uploads], RoundInfo(t, self.seed), st.server_memory)

        def decode(u: "_Upload", buffers: DecodeBuffers | None) -> Payload:
            got = self._decode(u.data, buffers)
            if u.scale != 1.0:
                got = Payload({k: v * u.scale for k, v in got.tensors.items()}, got.seeds, got.meta)
            return got

        bc, memory = aggregate_encoded(agg, uploads, decode)
        enc = encode(bc, cfg.download_positions, cfg.download_dtype)
        shapes = {k: tuple(st.global_state[k].shape) for k in bc.tensors}
        decoded = decode_payload(enc.data, shapes)  # decoded once; everyone applies these bytes
        new = alg.apply_broadcast(st.global_state, decoded)
        bad = [k for k in decoded.tensors if not bool(torch.isfinite(new[k]).all())]
        if bad:
            raise FloatingPointError(f"the new global state would hold non-finite values in {bad[:3]}")
        st.global_state, st.server_memory = new, memory
        st.history.append((t, enc.data, enc.bound_bytes))
        return enc, {**bc.stats, **factor_norms(st.global_state)}

    def _finish_round(self, t, clients, records: list[ClientRound], accepted, broadcast_bytes, server_s, wall0,
                      diagnostics) -> dict[str, Any]:  # fmt: skip
        """The round's ledger record (evaluating when due); updates the running totals."""
        st, cfg = self.state, self.cfg
        out: dict[str, Any] = {
            "round": t,
            "runtime": self.transport.name,
            "clients": clients,
            "accepted": len(accepted),
            "dropped": [{"client": r.client, "reason": r.reason} for r in records if r.status != "ok"],
            "upload_bytes": sum(r.upload_bytes for r in records),
            "download_bytes": sum(r.download_bytes for r in records),
            "upload_bound_bytes": sum(r.upload_bound_bytes for r in records),
            "download_bound_bytes": sum(r.download_bound_bytes for r in records),
            "broadcast_bytes": broadcast_bytes,
            "server_seconds": server_s,
            "train_seconds": sum(r.train_seconds or 0.0 for r in records),
        }
        kept = [r.diagnostics["upload_kept_energy"] for r in records if "upload_kept_energy" in r.diagnostics]
        if kept:
            diagnostics = {**diagnostics, "upload_kept_energy": sum(kept) / len(kept)}
        if diagnostics:
            out["diagnostics"] = diagnostics
        st.round = t
        if t % cfg.eval_every == 0 or t == cfg.rounds:
            t0 = time.perf_counter()
            out["eval"] = self.evaluate(t)
            out["eval_seconds"] = time.perf_counter() - t0
            sent = out["eval"].pop("download_bytes", 0)  # Flower: catch-ups sent for the evaluation only
            if sent:
                out["eval_download_bytes"] = int(sent)
        out["wall_seconds"] = time.perf_counter() - wall0
        tot = st.totals
        for k in tot:
            tot[k] += float(out.get(k, 0.0))
        out["cum_upload_bytes"] = int(tot["upload_bytes"])
        out["cum_download_bytes"] = int(tot["download_bytes"])
        out["per_client"] = [r.to_dict() for r in records]
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


@dataclass
class _Upload:
    """An accepted upload as the server keeps it until the round is aggregated: its encoded
    bytes (a few percent of a dense copy for sparse uploads), weight, norm and clip scale."""

    client: int
    weight: int
    data: bytes
    norm: float
    scale: float = 1.0


def aggregate_evaluations(results: list[EvalResult]) -> dict[str, float]:
    """Per-client evaluations pooled by test samples (clients without test samples count 0)."""
    n = sum(r.samples for r in results)
    if not n:
        return {"accuracy": float("nan"), "loss": float("nan"), "samples": 0, "clients": len(results)}
    out = {"accuracy": sum(r.accuracy * r.samples for r in results) / n,
           "loss": sum(r.loss * r.samples for r in results) / n, "samples": int(n), "clients": len(results)}  # fmt: skip
    sent = sum(r.download_bytes for r in results)
    if sent:
        out["download_bytes"] = sent
    return out


def upload_norm(payload: Payload) -> float:
    """The L2 norm of all of an upload's values together, in float64 (no overflow for finite fp32)."""
    return math.sqrt(sum(float(torch.sum(v.double() ** 2)) for v in payload.tensors.values()))


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
