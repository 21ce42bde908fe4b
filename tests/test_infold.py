"""The in-memory fold of a propagating capture that drops its activations (issue 25):
the same R and factors as the capture that writes its rows and reduces them from the store,
nothing written for the rows, and a kill at any point of a group's fold and commit resumed
to the same result."""

from __future__ import annotations

import pytest
import torch

from coala_stream import applied
from coala_stream.reduce import read_result
from coala_stream.sequential import SequentialConfig
from coala_stream.sequential import run as run_capture
from coala_stream.sequential.infold import FOLDED, GroupFold
from coala_stream.store import open_store
from coala_stream.store.commit import CommitProtocol

from .test_capture import text_file  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_torch_thread")

# 12 x 32 rows = 6 chunks of 64: the pairs (n = 128) fold in groups of 4 chunks, so each
# input commits mid-way and at its end; down_proj's narrow pair (160 + 64) in one group of 6
SETTINGS = dict(sequential=True, propagate=True, ratio=0.3, objective="output", alpha=0.5,
                refine_steps=2, refine_lr=1e-3, samples=12, seq_len=32, chunk_tokens=64)


def config(model_dir, out, text_file, **kw) -> SequentialConfig:
    return SequentialConfig(out=str(out), model=str(model_dir), data=str(text_file),
                            **{**SETTINGS, **kw})


@pytest.fixture(scope="module")
def written(tiny_model_dir, text_file, tmp_path_factory):
    """The capture that writes every row to the store and reduces it from there."""
    model_dir = tiny_model_dir("float32", num_hidden_layers=3)
    out = tmp_path_factory.mktemp("written") / "w.zarr"
    run_capture(config(model_dir, out, text_file), progress=False)
    return model_dir, out


def assert_same_results(ref, out) -> None:
    with open_store(ref) as r, open_store(out) as o:
        assert r.inputs == o.inputs
        for name in r.inputs:
            a, b = r.input(name), o.input(name)
            assert (a.tokens, a.num_chunks, a.chunk_crc32) == (b.tokens, b.num_chunks,
                                                               b.chunk_crc32), name
            assert b.dropped == b.num_chunks and b.dropped == 6, name  # all but none left
            ra, rb = read_result(r, name), read_result(o, name)
            assert torch.equal(ra.R, rb.R) and torch.equal(ra.abs_sum, rb.abs_sum), name
            assert rb.complete and rb.meta["fingerprint"] == o.fingerprint(name), name
        fa, fb = applied.read_all(r)[0], applied.read_all(o)[0]
        assert fa.keys() == fb.keys() and len(fa) == 21
        for name in fa:
            assert torch.equal(fa[name][0], fb[name][0]) and torch.equal(fa[name][1], fb[name][1])


def test_rows_folded_in_memory_give_the_same_store_r_and_factors(written, text_file, tmp_path):
    model_dir, ref = written
    out = tmp_path / "f.zarr"
    s = run_capture(config(model_dir, out, text_file, drop_activations=True), progress=False)
    assert s["raw_bytes"] == 0  # not one row written
    assert_same_results(ref, out)
    with open_store(out) as o:
        assert not any((out / "inputs" / name / "c").exists() and any(
            p.is_file() for p in (out / "inputs" / name / "c").rglob("*")) for name in o.inputs)


@pytest.mark.parametrize("when", ["before the result", "between the result and the commit"])
def test_a_failure_in_a_group_fold_resumes_to_the_same_result(written, text_file, tmp_path,
                                                              monkeypatch, when):
    model_dir, ref = written
    out = tmp_path / "f.zarr"
    calls = []
    real_commit = CommitProtocol.commit_folded
    from coala_stream.sequential import infold

    real_write = infold.write_result

    def write(path, part, meta):  # the 6th group: block 0's third input (gate/up), its second
        calls.append(meta["input"])
        if len(calls) == 6 and when == "before the result":
            raise RuntimeError("injected failure")
        return real_write(path, part, meta)

    def commit(self, name, crcs, samples_done=0):
        if len(calls) == 6 and when != "before the result":
            raise RuntimeError("injected failure")
        return real_commit(self, name, crcs, samples_done)

    monkeypatch.setattr(infold, "write_result", write)
    monkeypatch.setattr(CommitProtocol, "commit_folded", commit)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_capture(config(model_dir, out, text_file, drop_activations=True), progress=False)
    name = calls[-1]
    with open_store(out) as o:
        meta = read_result(o, name).meta
        assert o.input(name).num_chunks == 4  # the commit of its last group did not happen
        if when == "before the result":
            assert meta["next_chunk"] == 4
        else:  # written ahead: its checksums say what to commit
            assert meta["next_chunk"] == 6 and len(meta[FOLDED]) == 6
    monkeypatch.undo()
    run_capture(config(model_dir, out, text_file, drop_activations=True), progress=False)
    assert_same_results(ref, out)


def test_commit_folded_records_chunks_that_were_never_written(tmp_path):
    """The store side: the fingerprint a result written ahead records is the one the store
    gives once the chunks are committed; the chunks read as dropped, never as data; an input
    with chunks written and no result is left to the writing path."""
    from coala_stream.errors import StoreError
    from coala_stream.reduce import ReduceConfig
    from coala_stream.store import create_store
    from coala_stream.store import format as fmt

    rows = [torch.randn(64, 8) for _ in range(3)]
    crcs = [fmt.crc32(fmt.to_stored(r)) for r in rows]
    with create_store(tmp_path / "s.zarr", "zarr", {"dtype": "float32", "chunk_tokens": 64}) as st:
        st.create_input("x", 8, ["a.proj"])
        st.create_input("w", 8, ["b.proj"])
        st.commit(0, {"w": (64, [st.write_chunk("w", 0, rows[0])])})
        assert GroupFold.open(st, "w", ReduceConfig(device="cpu")) is None
        assert GroupFold.open(st, "x", ReduceConfig(device="cpu")) is not None
        ahead = st.fingerprint("x", ahead=crcs[:2])
        st.commit_folded("x", crcs[:2])
        info = st.input("x")
        assert (info.tokens, info.num_chunks, info.dropped) == (128, 2, 2)
        assert st.fingerprint("x") == ahead
        with pytest.raises(StoreError, match="--drop-activations"):
            st.read_chunk("x", 1)
        with pytest.raises(StoreError, match="change its 2 committed chunks"):
            st.fingerprint("x", ahead=[crcs[1], crcs[0], crcs[2]])
        st.commit_folded("x", crcs)  # extends, as a later group does
        assert st.input("x").num_chunks == 3 and st.fingerprint("x") == st.fingerprint(
            "x", ahead=crcs)
    with open_store(tmp_path / "s.zarr") as st:  # as committed, after a reopen
        assert (st.input("x").tokens, st.input("x").dropped) == (192, 3)
