"""A real loopback deployment with TLS and SuperNode authentication, from keys made here: a
self-signed CA and a server certificate for 127.0.0.1/localhost (openssl), P-384 SuperNode keys
(ssh-keygen). The SuperLink serves HTTPS only and runs with `--enable-supernode-auth`; one
SuperNode's public key is registered with `flwr supernode register`. That node trains a 1-round
FedSRD run, while a node with an unregistered key, one with no key and one trusting another CA are
turned away. Every process started here is stopped (its whole process group) in a `finally`, and
each step has a time limit. Helpers come from test_flower_deployment (the insecure deployment)."""

import json
import subprocess
import time
from pathlib import Path

import pytest
from test_flower_deployment import BIN, REPO, SUMMARY_WAIT, env_for, free_port, stop, stop_all

pytestmark = pytest.mark.slow

RUN_CONFIG = ("algorithm='fedsrd' set='task.num_clients=1;sim.rounds=1;sim.fraction=1.0' "
              "round-timeout=60.0 nodes-timeout=30.0")  # fmt: skip
# why each of the other SuperNodes gives up (it exits by itself; flwr exit code 305)
REJECTED = {
    "unregistered": "[code: 2004] Failed to activate SuperNode",  # signed with a key the SuperLink doesn't know
    "no-key": "[code: 2001] SuperNode authentication is enabled",  # would self-register: refused under auth
    "wrong-ca": "CERTIFICATE_VERIFY_FAILED",  # the server certificate isn't signed by the CA it trusts
}


def make_keys(d: Path) -> None:
    """ca.crt, other-ca.crt (an unrelated CA), server.crt/.key for 127.0.0.1, node-0 and node-1 (+ .pub)."""

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


def until(what: str, check, timeout: float, every: float):
    """check()'s first truthy result, polling every `every` s for at most `timeout` s."""
    deadline = time.monotonic() + timeout
    while not (result := check()):
        assert time.monotonic() < deadline, f"{what}: not after {timeout} s"
        time.sleep(every)
    return result


def test_tls_superlink_trains_with_the_registered_supernode_only(tmp_path):
    make_keys(tmp_path)
    ca, port, out = tmp_path / "ca.crt", free_port(), tmp_path / "run"
    home = tmp_path / "flwr-home"
    home.mkdir()
    (home / "config.toml").write_text(
        f'[superlink]\ndefault = "tls"\n\n[superlink.tls]\naddress = "127.0.0.1:{port}"\nroot-certificates = "{ca}"\n'
    )
    env = env_for(home)
    procs: dict[str, subprocess.Popen] = {}

    def start(name: str, *args: str) -> None:
        with open(tmp_path / f"{name}.log", "w") as log:
            procs[name] = subprocess.Popen([str(BIN / args[0]), *args[1:]], cwd=tmp_path, env=env, stdout=log,
                                           stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    def supernode(name: str, ca: Path, *args: str) -> None:
        start(name, "flower-supernode", "--root-certificates", str(ca), "--superlink", f"127.0.0.1:{port}",
              "--port", str(free_port()), "--node-config", "partition-id=0 num-partitions=1", *args)  # fmt: skip

    def flwr_json(*args: str) -> dict:  # `--format json` exits 0 even when it fails: "success" tells
        r = subprocess.run([str(BIN / "flwr"), *args, "tls", "--format", "json"], cwd=REPO, env=env,
                           capture_output=True, text=True, timeout=60)  # fmt: skip
        return json.loads(r.stdout)

    try:
        start("superlink", "flower-superlink", "--ssl-ca-certfile", str(ca), "--ssl-certfile",
              str(tmp_path / "server.crt"), "--ssl-keyfile", str(tmp_path / "server.key"), "--enable-supernode-auth",
              "--isolation", "subprocess", "--disable-runtime-dependency-installation",
              "--host", "127.0.0.1", "--port", str(port))  # fmt: skip
        # register node-0's public key over HTTPS (the CLI trusts ca.crt), as soon as the SuperLink answers
        reg = until("flwr supernode register", lambda: (r := flwr_json("supernode", "register",
                    str(tmp_path / "node-0.pub")))["success"] and r, 180, 2)  # fmt: skip
        node_id = int(reg["node-id"])

        supernode("registered", ca, "--auth-supernode-private-key", str(tmp_path / "node-0"))
        supernode("unregistered", ca, "--auth-supernode-private-key", str(tmp_path / "node-1"))
        supernode("no-key", ca)
        supernode("wrong-ca", tmp_path / "other-ca.crt", "--auth-supernode-private-key", str(tmp_path / "node-0"))
        for name, reason in REJECTED.items():
            try:
                procs[name].wait(120)
            except subprocess.TimeoutExpired:
                pass
            log = (tmp_path / f"{name}.log").read_text()
            assert procs[name].returncode not in (None, 0) and reason in log, f"{name} wasn't turned away:\n{log}"
        assert f"SuperNode ID: {node_id}" in (tmp_path / "registered.log").read_text()
        # the SuperLink knows one node, the registered one, online
        nodes = until("registered node online", lambda: (n := flwr_json("supernode", "list")["nodes"])
                      and n[0]["status"] == "online" and n, 120, 2)  # fmt: skip
        assert [int(n["node-id"]) for n in nodes] == [node_id]

        run = subprocess.Popen([str(BIN / "flwr"), "run", ".", "tls", "--stream", "--run-config",
                                f"{RUN_CONFIG} out-dir='{out}'"], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True, start_new_session=True)  # fmt: skip
        procs["run"] = run
        try:
            until("summary.json", lambda: (out / "summary.json").exists() or run.poll() is not None, SUMMARY_WAIT, 0.5)
        finally:
            stop(run)
        assert (out / "summary.json").exists(), f"no summary; flwr run said:\n{run.stdout.read()[-3000:]}"
    finally:
        stop_all(list(procs.items()))  # the ServerApp and ClientApp they started too

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["round"] for r in records] == [1]
    assert records[0]["accepted"] == 1 and records[0]["dropped"] == []
    assert [c["node_id"] for c in records[0]["per_client"]] == [node_id]
    assert json.loads((out / "summary.json").read_text())["rounds"] == 1
