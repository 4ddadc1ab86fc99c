"""A real loopback deployment with TLS and SuperNode authentication, from keys made here: a
self-signed CA and a server certificate for 127.0.0.1/localhost (openssl), P-384 SuperNode keys
(ssh-keygen). The SuperLink serves HTTPS only and has `--enable-supernode-auth`; one SuperNode's
public key is registered with `flwr supernode register`. That node trains a 1-round FedSRD run;
a node with an unregistered key, one with no key and one trusting a different CA are turned away.
Every process started here is stopped (its whole process group) in a `finally`, and each step has
a time limit. The helpers come from test_flower_deployment (the insecure deployment)."""

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from test_flower_deployment import BIN, REPO, SUMMARY_WAIT, alive, descendants, env_for, free_port, stop

pytestmark = pytest.mark.slow


def make_keys(d: Path) -> None:
    """ca.crt (+ other-ca.crt, an unrelated CA), server.crt/.key for 127.0.0.1, node-{0,1}(.pub)."""

    def sh(*cmd: str) -> None:
        subprocess.run(cmd, cwd=d, check=True, capture_output=True, timeout=60)

    for ca in ("ca", "other-ca"):
        sh("openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2", "-subj", f"/CN=test {ca}",
           "-keyout", f"{ca}.key", "-out", f"{ca}.crt")  # fmt: skip
    sh("openssl", "req", "-newkey", "rsa:2048", "-nodes", "-subj", "/CN=localhost", "-keyout", "server.key",
       "-out", "server.csr")  # fmt: skip
    (d / "san.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    sh("openssl", "x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
       "-days", "2", "-extfile", "san.ext", "-out", "server.crt")  # fmt: skip
    for node in ("node-0", "node-1"):
        sh("ssh-keygen", "-q", "-t", "ecdsa", "-b", "384", "-N", "", "-f", node)


def flwr(env, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "flwr"), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout, start_new_session=True)  # fmt: skip


def until(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(every)
    return result


def test_tls_superlink_trains_only_with_the_registered_supernode(tmp_path):
    make_keys(tmp_path)
    ca, port, out = tmp_path / "ca.crt", free_port(), tmp_path / "run"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    env = env_for(home)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> subprocess.Popen:
        log = open(tmp_path / f"{name}.log", "w")
        procs[name] = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=log,
                                       stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
        return procs[name]

    def supernode(name: str, *args: str) -> subprocess.Popen:
        return start(name, "flower-supernode", "--superlink", f"127.0.0.1:{port}", "--port", str(free_port()),
                     "--node-config", "partition-id=0 num-partitions=1", *args)  # fmt: skip

    try:
        start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca),
              "--ssl-certfile", str(tmp_path / "server.crt"), "--ssl-keyfile", str(tmp_path / "server.key"),
              "--enable-supernode-auth", "--database", str(tmp_path / "state.db"),
              "--isolation", "subprocess", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(port))  # fmt: skip
        # register node-0's key (over HTTPS, trusting ca.crt) once the SuperLink answers
        # (`--format json` exits 0 even on failure: the JSON says whether it worked)
        reg = until("flwr supernode register", lambda: (r := json.loads(flwr(env, "supernode", "register",
                    str(tmp_path / "node-0.pub"), "tls", "--format", "json").stdout))["success"] and r, 180, 2)  # fmt: skip
        node_id = reg["node-id"]

        supernode("registered", "--root-certificates", str(ca), "--auth-supernode-private-key", str(tmp_path / "node-0"))
        supernode("unregistered", "--root-certificates", str(ca), "--auth-supernode-private-key", str(tmp_path / "node-1"))
        supernode("no-key", "--root-certificates", str(ca))
        supernode("wrong-ca", "--root-certificates", str(tmp_path / "other-ca.crt"),
                  "--auth-supernode-private-key", str(tmp_path / "node-1"))  # fmt: skip

        # the three others give up by themselves, each with its own reason
        for name in ("unregistered", "no-key", "wrong-ca"):
            try:
                procs[name].wait(120)
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{name} still running:\n{(tmp_path / f'{name}.log').read_text()[-3000:]}")
            assert procs[name].returncode != 0, name
        logs = {name: (tmp_path / f"{name}.log").read_text() for name in procs}
        print({k: v[-1500:] for k, v in logs.items() if k != "superlink"})

        def listed():
            r = flwr(env, "supernode", "list", "tls", "--format", "json")
            return r.returncode == 0 and json.loads(r.stdout)

        nodes = until("registered node online", lambda: (n := listed()) and any(x.get("status") == "online" for x in n.get("nodes", [])) and n, 120, 2)
        print(nodes)

        run = subprocess.Popen([str(BIN / "flwr"), "run", ".", "tls", "--stream", "--run-config",
                                f"algorithm='fedsrd' set='task.num_clients=1;sim.rounds=1;sim.fraction=1.0' "
                                f"out-dir='{out}' round-timeout=60.0 nodes-timeout=30.0"], cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        procs["run"] = run
        try:
            until("summary.json", lambda: (out / "summary.json").exists() or run.poll() is not None, SUMMARY_WAIT, 0.5)
        finally:
            stop(run)
        assert (out / "summary.json").exists(), run.stdout.read()[-3000:]
    finally:
        family = {d for p in procs.values() for d in descendants(p.pid)}  # e.g. the ServerApp, the ClientApp
        for p in procs.values():
            stop(p)
        for pid in family:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.5)
        assert all(p.poll() is not None for p in procs.values()) and not [pid for pid in family if alive(pid)]

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1] and records[0]["accepted"] == 1
