"""The RPC server that runs on a board (native, or an aarch64 Python under qemu user mode).

Why not upstream `tvm.exec.rpc_server`: it starts its listener through a Popen worker that execs a second
interpreter (needs binfmt_misc under qemu), and when a kernel crashes the session process (SIGILL, SIGSEGV) it
raises in the listen loop and drops off the tracker for good. Here each session is served in a *forked* child
(fork works under qemu user mode; exec of a foreign binary does not), so a crashing kernel only kills that child:
the worker logs the signal, re-registers with the tracker and serves the next session. The host-side
supervisor (`agile_tvm.rpc.supervisor`) restarts this whole process if it dies anyway.

Imports: standard library and the TVM runtime only (the board has no compiler and no agile_tvm dependencies).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import time

LOG_PREFIX = "[board]"

# aarch64 AT_HWCAP / AT_HWCAP2 bits (linux/arch/arm64/include/uapi/asm/hwcap.h) that matter for int8 kernels.
AARCH64_HWCAP = {0: "fp", 1: "asimd", 7: "crc32", 8: "atomics", 10: "asimdhp", 12: "asimdrdm", 20: "asimddp",
                 22: "sve"}
AARCH64_HWCAP2 = {1: "sve2", 13: "i8mm", 14: "bf16"}
AT_HWCAP, AT_HWCAP2 = 16, 26


def log(msg: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {LOG_PREFIX} {msg}", file=sys.stderr, flush=True)


def cpu_features() -> list[str]:
    """The ISA features the kernel reports for this process (what qemu's -cpu model really implements)."""
    machine = platform.machine()
    if machine in ("aarch64", "arm64"):
        libc = ctypes.CDLL(None)
        libc.getauxval.restype = ctypes.c_ulong
        hw1, hw2 = libc.getauxval(AT_HWCAP), libc.getauxval(AT_HWCAP2)
        feats = [name for bit, name in AARCH64_HWCAP.items() if hw1 >> bit & 1]
        feats += [name for bit, name in AARCH64_HWCAP2.items() if hw2 >> bit & 1]
        return sorted(feats)
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("flags"):
                    return sorted(set(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return []


def register_board_functions(profile: str, key: str) -> None:
    """Globals a client can call over RPC: `agile_tvm.board.info` (ISA checks before tuning)."""
    import tvm_ffi

    info = json.dumps({"machine": platform.machine(), "profile": profile, "key": key, "features": cpu_features(),
                       "pid": os.getpid()})

    @tvm_ffi.register_global_func("agile_tvm.board.info", override=True)
    def _board_info():
        return info


def load_runtime_extra() -> None:
    """MetaSchedule's RPC runner calls `tvm.contrib.random.random_fill_for_measure`, which lives in
    libtvm_runtime_extra; a runtime-only import (TVM_USE_RUNTIME_LIB=1) does not load it."""
    import tvm_ffi

    if tvm_ffi.get_global_func("tvm.contrib.random.random_fill_for_measure", allow_missing=True) is not None:
        return
    import tvm

    libdir = os.path.join(os.path.dirname(tvm.__file__), "lib")
    path = os.path.join(libdir, "libtvm_runtime_extra.so")
    if os.path.exists(path):
        ctypes.CDLL(path, ctypes.RTLD_GLOBAL)


def tracker_register(tracker: tuple[str, int], key: str, port: int, custom_addr: str | None):
    """Connect to the tracker (retrying forever: a restarted tracker is waited for) and announce this board."""
    from tvm.rpc import base
    from tvm.rpc.base import TrackerCode

    delay = 1.0
    while True:
        try:
            conn = socket.create_connection(tracker, timeout=10)
            conn.settimeout(None)
            conn.sendall(struct.pack("<i", base.RPC_TRACKER_MAGIC))
            magic = struct.unpack("<i", base.recvall(conn, 4))[0]
            if magic != base.RPC_TRACKER_MAGIC:
                log(f"{tracker[0]}:{tracker[1]} is not a TVM RPC tracker; retrying")
                conn.close()
            else:
                base.sendjson(conn, [TrackerCode.UPDATE_INFO, {"key": "server:" + key, "addr": (custom_addr, port)}])
                if base.recvjson(conn) != TrackerCode.SUCCESS:
                    raise OSError("tracker refused UPDATE_INFO")
                return conn
        except OSError as exc:
            log(f"tracker {tracker[0]}:{tracker[1]} unreachable ({exc}); retrying in {delay:.0f} s")
        time.sleep(delay)
        delay = min(delay * 2, 10.0)


def wait_for_client(listen_sock, tracker_conn, key: str, port: int, custom_addr: str | None):
    """Offer a fresh match key on the tracker and wait for the client the tracker sends; return (conn, opts).

    Same handshake as upstream's listen loop: ping the tracker every 2 s; when our key was handed to a client that
    never came, offer a new one.
    """
    from tvm.rpc import base
    from tvm.rpc.base import TrackerCode

    used = set()
    matchkey = None

    def offer():
        nonlocal matchkey
        matchkey = base.random_key(key, cmap=used)
        used.add(matchkey)
        if tracker_conn is not None:
            base.sendjson(tracker_conn, [TrackerCode.PUT, key, (port, matchkey), custom_addr])
            if base.recvjson(tracker_conn) != TrackerCode.SUCCESS:
                raise OSError("tracker refused PUT")

    offer()
    unmatched = 0
    while True:
        if tracker_conn is not None:
            ready, _, _ = select.select([listen_sock], [], [], 2.0)
            if not ready:
                base.sendjson(tracker_conn, [TrackerCode.GET_PENDING_MATCHKEYS])
                pending = base.recvjson(tracker_conn)
                unmatched = unmatched + 1 if matchkey not in pending else 0
                if unmatched >= 4:
                    offer()
                    unmatched = 0
                continue
        conn, addr = listen_sock.accept()
        try:
            conn.settimeout(10)
            magic = struct.unpack("<i", base.recvall(conn, 4))[0]
            if magic != base.RPC_MAGIC:
                conn.close()
                continue
            keylen = struct.unpack("<i", base.recvall(conn, 4))[0]
            words = base.recvall(conn, keylen).decode("utf-8").split()
            expected = "client:" + (matchkey if tracker_conn is not None else key)
            if not words or words[0] != expected:
                conn.sendall(struct.pack("<i", base.RPC_CODE_MISMATCH))
                conn.close()
                log(f"key mismatch from {addr[0]}")
                continue
            server_key = ("server:" + key).encode("utf-8")
            conn.sendall(struct.pack("<i", base.RPC_CODE_SUCCESS))
            conn.sendall(struct.pack("<i", len(server_key)) + server_key)
            conn.settimeout(None)
        except OSError as exc:
            log(f"handshake with {addr[0]} failed: {exc}")
            conn.close()
            continue
        opts = {}
        for word in words[1:]:
            if word.startswith("-timeout="):
                opts["timeout"] = float(word[len("-timeout="):])
        return conn, addr, opts


def serve_session(conn, opts) -> str:
    """Serve one RPC session in a forked child; return how it ended ("ok", "crashed: SIGILL", "timeout")."""
    from tvm.rpc import _ffi_api
    from tvm.rpc.server import _server_env
    from tvm.support import utils

    workdir = tempfile.mkdtemp(prefix="agile-tvm-board-")
    pid = os.fork()
    if pid == 0:  # child: serve, then leave without running the parent's cleanup
        code = 0
        try:
            os.chdir(workdir)
            temp = utils.tempdir(custom_path=os.path.join(workdir, "session"), keep_for_debug=True)
            _server_env(None, temp)
            _ffi_api.ServerLoop(conn.fileno())
        except BaseException as exc:  # noqa: BLE001 - report and exit the child whatever happened
            log(f"session error: {exc}")
            code = 1
        finally:
            os._exit(code)
    conn.close()
    timeout = opts.get("timeout") or None
    deadline = time.time() + timeout + 5 if timeout else None
    status = None
    while status is None:
        done, st = os.waitpid(pid, os.WNOHANG)
        if done:
            status = st
            break
        if deadline and time.time() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            shutil.rmtree(workdir, ignore_errors=True)
            return f"timeout: session exceeded {timeout:.0f} s, killed"
        time.sleep(0.05)
    shutil.rmtree(workdir, ignore_errors=True)
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"crashed: {name}"
    code = os.WEXITSTATUS(status)
    return "ok" if code == 0 else f"exited with code {code}"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description="agile-tvm board RPC server (runs on the board)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True)
    parser.add_argument("--tracker", default=None, help="HOST:PORT of the tracker")
    parser.add_argument("--profile", default="native")
    parser.add_argument("--custom-addr", default=None)
    args = parser.parse_args(argv)

    global LOG_PREFIX
    LOG_PREFIX = f"[board {args.key}/{args.profile} pid {os.getpid()}]"
    load_runtime_extra()
    register_board_functions(args.profile, args.key)

    listen_sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listen_sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listen_sock.bind((args.host, args.port))
    listen_sock.listen(4)
    tracker = None
    if args.tracker:
        host, _, port = args.tracker.rpartition(":")
        tracker = (host, int(port))
    log(f"listening on {args.host}:{args.port}, features: {' '.join(cpu_features()[:12])}")

    tracker_conn = None
    while True:
        try:
            if tracker is not None and tracker_conn is None:
                tracker_conn = tracker_register(tracker, args.key, args.port, args.custom_addr)
                log(f"registered with tracker {tracker[0]}:{tracker[1]} under key {args.key!r}")
            conn, addr, opts = wait_for_client(listen_sock, tracker_conn, args.key, args.port, args.custom_addr)
        except (OSError, ValueError, TypeError) as exc:  # tracker dropped or garbled: reconnect
            log(f"tracker connection lost ({exc}); reconnecting")
            if tracker_conn is not None:
                tracker_conn.close()
            tracker_conn = None
            time.sleep(0.5)
            continue
        outcome = serve_session(conn, opts)
        if outcome != "ok":
            log(f"session from {addr[0]} {outcome}; still serving")


if __name__ == "__main__":
    sys.exit(main())
