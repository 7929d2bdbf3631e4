"""Reading GGUF files: the fast, parse-once reader gives what gguf's own reader gives."""

from __future__ import annotations

import gguf
import numpy as np

from ftflow.prepare import gguf_read_once


def write_gguf(path):
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(2)
    writer.add_array("tokenizer.ggml.tokens", [f"tok{i}\u2581é" for i in range(3000)])
    writer.add_array("tokenizer.ggml.scores", [float(i) / 7 for i in range(3000)])
    writer.add_string("general.name", "tiny")
    writer.add_tensor("token_embd.weight", np.arange(48, dtype=np.float32).reshape(6, 8))
    writer.add_tensor("blk.0.attn_q.weight", np.linspace(-1, 1, 64, dtype=np.float32).reshape(8, 8))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def contents(reader):
    fields = {name: field.contents() for name, field in reader.fields.items()}
    tensors = {t.name: (t.tensor_type, np.array(t.data).tolist()) for t in reader.tensors}
    return fields, tensors


def test_the_fast_reader_reads_what_gguf_reads_once_per_file_and_is_undone_after(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_gguf(path)
    original = gguf.GGUFReader
    expected = contents(original(str(path)))
    assert len(expected[0]["tokenizer.ggml.tokens"]) == 3000
    with gguf_read_once():
        reader = gguf.GGUFReader(str(path))
        assert contents(reader) == expected
        assert not isinstance(reader.data, np.memmap)  # slices of a plain array view: no per-element overhead
        assert gguf.GGUFReader(str(tmp_path / "." / "tiny.gguf")) is reader  # parsed once per file
        assert gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2) is gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, 2)
    assert gguf.GGUFReader is original
    assert gguf.GGUFReader(str(path)) is not gguf.GGUFReader(str(path))
