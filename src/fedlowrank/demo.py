"""A short demo of one federated round per algorithm on random LoRA factors.

Four clients start from the same global LoRA state (two modules, r = 16) and each trains to a
different nearby state (random Gaussian steps with a few heavy rows, as real updates have). Each
algorithm turns the clients' states into uploads, a server broadcast and a new global state, with
every payload encoded by `fedlowrank.codec`, decoded, and the decoded broadcast applied (as every
client would apply it). The demo measures, per algorithm:

* bytes up (per client) and down (per client), next to the information bound of the uploads;
* server seconds;
* update error: || dW_applied - dW_mean || / || dW_mean ||, where dW_mean = mean_i B_i A_i - B A is
  the exact average of the clients' updates in full-rank space and dW_applied the change of B A
  the broadcast makes. FedAvg errs because the mean of products is not the product of means,
  FlexLoRA by its rank-r truncation, the sparse methods by what they drop.
"""

from __future__ import annotations

import time

import torch

from fedlowrank.algorithms import ClientInfo, RoundInfo, make_algorithm
from fedlowrank.codec import decode_payload, encode_payload, payload_stats
from fedlowrank.lora import lora_pairs

MODULES = {"layers.0.self_attn.q_proj": (1024, 1024), "layers.0.mlp.up_proj": (2816, 1024)}
RANK, CLIENTS = 16, 4
ALGORITHMS = ["fedavg", "fedprox", "ffa-lora", "flexlora", "fed-dare", "fedavg-magnitude", "fedavg-importance", "fedsrd-e", "fedsrd", "fedsrd-plus"]


def _global_state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    state = {}
    for name, (d_out, d_in) in MODULES.items():
        state[f"{name}.lora_A"] = torch.randn(RANK, d_in, generator=g) / d_in**0.5
        state[f"{name}.lora_B"] = 0.01 * torch.randn(d_out, RANK, generator=g)  # mid-training
    return state


def _client_states(alg, start, seed: int) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed + 1)
    trainable = set(alg.trainable_keys(start))
    out = []
    for _ in range(CLIENTS):
        s = {}
        for k, v in start.items():
            step = 0.1 * v.std() * torch.randn(v.shape, generator=g)
            heavy = torch.rand(v.shape[0], 1, generator=g) < 0.05  # a few rows move a lot
            s[k] = v + torch.where(heavy, 10 * step, step) if k in trainable else v
        out.append(s)
    return out


def _product_error(start, new, clients) -> float:
    num = den = 0.0
    for b, a in lora_pairs(start).values():
        base = start[b] @ start[a]
        mean = sum(c[b] @ c[a] for c in clients) / len(clients) - base
        num += float(((new[b] @ new[a] - base) - mean).square().sum())
        den += float(mean.square().sum())
    return (num / den) ** 0.5


def run_one(name: str, seed: int = 0) -> dict:
    alg = make_algorithm(name)
    start = alg.init_state(_global_state(seed), seed)
    clients = _client_states(alg, start, seed)
    shapes = alg.upload_shapes(start)
    up = bound = 0.0
    uploads = []
    for i, trained in enumerate(clients):
        payload = alg.client_payload(start, trained, ClientInfo(round=1, client_id=i, seed=seed))
        data = encode_payload(payload, positions="auto")
        up += len(data)
        bound += payload_stats(payload, positions="auto")["bound_bytes"]
        uploads.append(decode_payload(data, shapes))
    t0 = time.perf_counter()
    broadcast = alg.server_broadcast(start, uploads, [1] * CLIENTS, RoundInfo(round=1, seed=seed))
    server_s = time.perf_counter() - t0
    data = encode_payload(broadcast, positions="auto")
    new = alg.apply_broadcast(start, decode_payload(data))
    return {
        "algorithm": name,
        "upload_kb": up / CLIENTS / 1e3,
        "upload_bound_kb": bound / CLIENTS / 1e3,
        "download_kb": len(data) / 1e3,
        "server_s": server_s,
        "update_error": _product_error(start, new, clients),
    }


def main() -> int:
    torch.manual_seed(0)
    dense_kb = sum(4 * RANK * (o + i) for o, i in MODULES.values()) / 1e3
    print(
        f"fedlowrank demo: one round, {CLIENTS} clients, LoRA r={RANK} on "
        + ", ".join(f"{o}x{i}" for o, i in MODULES.values())
        + f" ({dense_kb:.0f} kB of fp32 factors). Bytes are len(encoded payload)."
    )
    print(f"{'algorithm':<18} {'up kB/client':>12} {'bound kB':>9} {'down kB':>8} {'server s':>9} {'update error':>13}")
    rows = [run_one(n) for n in ALGORITHMS]
    for r in rows:
        print(
            f"{r['algorithm']:<18} {r['upload_kb']:>12.1f} {r['upload_bound_kb']:>9.1f} {r['download_kb']:>8.1f} "
            f"{r['server_s']:>9.3f} {r['update_error']:>13.3f}"
        )
    by = {r["algorithm"]: r for r in rows}
    total = lambda r: r["upload_kb"] + r["download_kb"]  # noqa: E731
    print(f"FedSRD moved {total(by['fedsrd']) / total(by['fedavg']):.1%} of FedAvg's bytes per client and round.")
    print("update error: how far the change the broadcast makes to B A lies from the exact mean of the clients'\n"
          "updates in full-rank space, ||dW_applied - dW_mean|| / ||dW_mean||. FedAvg errs because the mean of\n"
          "products is not the product of means, FlexLoRA by its rank-r truncation, the sparse methods by what they drop.")
    print("Real tasks: `fedlowrank run` (see README).")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
