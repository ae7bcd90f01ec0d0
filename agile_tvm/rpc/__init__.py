"""RPC boards for tuning and running kernels: a tracker, board servers that survive crashing kernels, and the
emulated aarch64 boards (qemu user mode) that stand in for the Snapdragon 870 and the Raspberry Pi 4.

`board_worker` runs *on the board* (possibly an emulated aarch64 Python with only the TVM runtime), so it and
this `__init__` import nothing beyond the standard library and `tvm`.
"""
