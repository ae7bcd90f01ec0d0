"""MetaSchedule tuning over RPC, and the tuned-schedule records that compilation applies.

Light imports only: `records` is what the compiler side needs; `tuner` pulls in MetaSchedule.
"""
