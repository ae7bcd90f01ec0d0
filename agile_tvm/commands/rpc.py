"""`agile-tvm tracker` and `agile-tvm board`: the RPC side of tuning (see agile_tvm/rpc/)."""

from __future__ import annotations


def register(subparsers) -> None:
    p = subparsers.add_parser("tracker", help="run a TVM RPC tracker (boards register with it, tune asks it)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=9190)
    p.set_defaults(func=run_tracker_cmd)

    p = subparsers.add_parser(
        "board", help="run a board RPC server (native, or emulated aarch64) that survives crashing kernels")
    p.add_argument("--key", required=True, help="the tracker key tuning asks for, e.g. x86-avx512, sd870, pi4")
    p.add_argument("--emulate", choices=["pi4", "sd870"], default=None,
                   help="run an emulated aarch64 board under qemu user mode (needs scripts/setup-boards)")
    p.add_argument("--tracker", default="127.0.0.1:9190", help="HOST:PORT of the tracker (default 127.0.0.1:9190)")
    p.add_argument("--host", default="127.0.0.1", help="bind address of the board server (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=0, help="board server port (default: a free one)")
    p.add_argument("--custom-addr", default=None, help="address the tracker hands to clients (multi-machine setups)")
    p.set_defaults(func=run_board_cmd)


def run_tracker_cmd(args) -> int:
    from agile_tvm.rpc.netutil import warn_if_exposed
    from agile_tvm.rpc.tracker import run_tracker

    warn_if_exposed(args.host, "tracker")
    return run_tracker(args.host, args.port)


def run_board_cmd(args) -> int:
    from agile_tvm.rpc.netutil import free_port, parse_hostport, warn_if_exposed
    from agile_tvm.rpc.supervisor import Supervisor

    parse_hostport(args.tracker)
    warn_if_exposed(args.host, "board RPC server")
    port = args.port or free_port(args.host)
    sup = Supervisor(args.key, args.emulate or "native", args.host, port, args.tracker)
    if args.custom_addr:
        sup.argv += ["--custom-addr", args.custom_addr]
    return sup.run()
