"""The end-to-end benchmark writes the record schema the issue fixes, one record per prompt length."""

from agile_tvm.models import tiny_model
from agile_tvm.runtime import bench

FIELDS = {"target", "model", "impl", "config", "tokens", "prefill_ms", "decode_tok_s", "size_mb"}


def test_torch_peer_records_have_the_schema_and_decode_on_the_shortest_prompt():
    model = tiny_model("llama").model
    records = bench._torch_records("torch", model, [16, 8], 3, 1, 1.5, "tiny-llama")
    assert [r["tokens"] for r in records] == [16, 8]
    for r in records:
        assert FIELDS <= set(r) and r["impl"] == "torch" and r["config"] == "fp32" and r["prefill_ms"] > 0
    by_len = {r["tokens"]: r for r in records}
    assert by_len[8]["decode_tok_s"] > 0 and by_len[16]["decode_tok_s"] is None
