"""Two hosts: a 2-node training (one `torchrun` launcher per node) between two network namespaces
joined by a veth pair, then one host is cut off. The surviving node must exit within the
collective timeout naming the lost rank, and `--resume auto` must reproduce an uninterrupted run.

Only the namespaces' own addresses (10.231.0.1/24, 10.231.0.2/24, inside namespaces this test
creates and always deletes) are used. Needs root and iproute2; skips with the reason elsewhere.
"""
import os
import shutil
import signal
import subprocess
import sys
import time
from contextlib import contextmanager

import pytest

import _faultutil as F
from hsc_fast import checkpoint as C

ADDRS = ("10.231.0.1", "10.231.0.2")
TIMEOUT_S = 20          # train.dist_timeout_s of the tiny config
EXIT_WITHIN_S = 60      # the surviving node must be gone by then after the cut


def _ip(*args, ns=None, check=True):
    cmd = (["ip", "netns", "exec", ns] if ns else []) + ["ip", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=30, check=check)


def _why_not() -> str:
    if os.geteuid() != 0:
        return "needs root to create network namespaces"
    if shutil.which("ip") is None:
        return "needs iproute2 ('ip')"
    probe = f"hsc-probe-{os.getpid()}"
    try:
        _ip("netns", "add", probe)
        _ip("netns", "del", probe)
    except (subprocess.SubprocessError, OSError) as e:
        return f"cannot create network namespaces here ({getattr(e, 'stderr', '') or e})"
    return ""


def _kill_processes_in(ns: str) -> None:
    """SIGKILL what runs in our namespace (torchrun starts its workers in their own sessions)."""
    pids = _ip("netns", "pids", ns, check=False).stdout.split()
    for pid in pids:
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


@contextmanager
def two_hosts():
    """Two namespaces ('hosts') with their own addresses, joined by a veth pair; always removed."""
    tag = os.getpid() % 100000
    names = (f"hsc-a-{tag}", f"hsc-b-{tag}")
    veths = (f"hsca{tag}", f"hscb{tag}")
    try:
        for ns in names:
            _ip("netns", "add", ns)
        _ip("link", "add", veths[0], "type", "veth", "peer", "name", veths[1])
        for ns, veth, addr in zip(names, veths, ADDRS):
            _ip("link", "set", veth, "netns", ns)
            _ip("addr", "add", f"{addr}/24", "dev", veth, ns=ns)
            _ip("link", "set", veth, "up", ns=ns)
            _ip("link", "set", "lo", "up", ns=ns)
        yield names, veths
    finally:
        for ns in names:
            _kill_processes_in(ns)
            _ip("netns", "del", ns, check=False)  # deletes its end of the veth pair, and so the pair
        _ip("link", "del", veths[0], check=False)


def _launch_nodes(names, veths, config, run_dir, args=()):
    """One torchrun per 'host': node 0 hosts the rendezvous at 10.231.0.1."""
    from hsc_fast.distributed import free_port
    port = free_port()  # free in the fresh namespaces anyway; any fixed port would do
    procs = []
    for node, (ns, veth) in enumerate(zip(names, veths)):
        env = F.clean_env(GLOO_SOCKET_IFNAME=veth, TP_SOCKET_IFNAME=veth)
        cmd = ["ip", "netns", "exec", ns, sys.executable, "-m", "torch.distributed.run",
               "--nnodes", "2", "--node_rank", str(node), "--nproc_per_node", "1",
               "--master_addr", ADDRS[0], "--master_port", str(port), "--max_restarts", "0",
               *F.train_cmd(config, run_dir, *args)[1:]]
        out = open(f"{run_dir}.{node}.out", "ab")
        procs.append(subprocess.Popen(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True))
        out.close()
        if node == 0:
            time.sleep(1.0)  # let node 0's rendezvous store come up first
    return procs


@pytest.mark.slow
def test_cut_off_host_ends_the_survivor_and_resume_auto_reproduces_the_run(tmp_path_factory, tmp_path):
    why = _why_not()
    if why:
        pytest.skip(why)
    shards = F.cached("shards", lambda: F.make_shards(tmp_path_factory.mktemp("synth")))
    config = F.cached("config", lambda: F.write_config(tmp_path_factory.mktemp("cfg") / "tiny.yaml", shards))
    reference = F.reference_run(tmp_path_factory, config)
    run = tmp_path / "run"
    with two_hosts() as (names, veths):
        procs = _launch_nodes(names, veths, config, run)
        try:
            F.wait_for_step(run, 3, procs, timeout=150)  # checkpoint 2 is complete
            _ip("link", "set", veths[1], "down", ns=names[1])  # host B falls off the network
            t0 = time.monotonic()
            try:
                code_a = procs[0].wait(timeout=EXIT_WITHIN_S)
            except subprocess.TimeoutExpired:
                code_a = None
            elapsed = time.monotonic() - t0
        finally:
            F.kill_all(procs)
            for ns in names:
                _kill_processes_in(ns)
        text = F.output_of(run, 0)
        assert code_a not in (0, None), f"surviving node: exit {code_a} after {elapsed:.0f} s\n{text[-3000:]}"
        assert elapsed < EXIT_WITHIN_S
        assert "rank 1 lost" in text, text[-3000:]
        assert C.find_latest(run) is not None and C.step_of(C.find_latest(run)) >= 2

        _ip("link", "set", veths[1], "up", ns=names[1])  # the host is back: resume on both
        procs = _launch_nodes(names, veths, config, run, ["--resume", "auto"])
        try:
            codes = F.wait_all(procs, 180)
        finally:
            F.kill_all(procs)
    assert codes == [0, 0], F.output_of(run, 0)[-3000:] + F.output_of(run, 1)[-3000:]
    F.assert_same_weights(F.final_weights(run), reference)
