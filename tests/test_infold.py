"""The in-memory fold of a block-by-block capture that drops its activations (issue 25),
propagating or plain: the same R (and factors) as the capture that writes its rows and
reduces them from the store, nothing written for the rows, and a kill at any point of a
group's fold and commit resumed to the same result."""

from __future__ import annotations

import pytest
import torch

from coala_stream import applied
from coala_stream.reduce import ReduceConfig, read_result, run_reduce
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


# A plain block-by-block capture (no propagation): 12 x 32 rows = 6 chunks of 64; q/k/v, o
# and gate/up (n = 64) fold 2 chunks at a time, down_proj (n = 160) 5 then 1, so a block's
# inputs commit at different points
PLAIN = dict(sequential=True, samples=12, seq_len=32, chunk_tokens=64)


def plain_config(model_dir, out, text_file, **kw) -> SequentialConfig:
    """A block-by-block capture without propagation (none of SETTINGS' output objective)."""
    return SequentialConfig(out=str(out), model=str(model_dir), data=str(text_file),
                            **PLAIN, **kw)


@pytest.fixture(scope="module")
def plain_written(tiny_model_dir, text_file, tmp_path_factory):
    model_dir = tiny_model_dir("float32", num_hidden_layers=2)
    out = tmp_path_factory.mktemp("plain") / "w.zarr"
    run_capture(plain_config(model_dir, out, text_file), progress=False)
    run_reduce(str(out), ReduceConfig(device="cpu"), progress=False)
    return model_dir, out


def assert_same_plain(ref, out) -> None:
    with open_store(ref) as r, open_store(out) as o:
        assert r.inputs == o.inputs and len(o.inputs) == 8
        for name in r.inputs:
            a, b = r.input(name), o.input(name)
            assert (a.tokens, a.num_chunks, a.chunk_crc32) == (b.tokens, b.num_chunks,
                                                               b.chunk_crc32), name
            assert b.dropped == b.num_chunks == 6, name
            ra, rb = read_result(r, name), read_result(o, name)
            assert torch.equal(ra.R, rb.R) and torch.equal(ra.abs_sum, rb.abs_sum), name
            assert rb.complete and rb.meta["fingerprint"] == o.fingerprint(name), name


def test_a_plain_capture_folds_in_memory_to_reduces_r(plain_written, text_file, tmp_path):
    """`capture --sequential --drop-activations`: the R's of capture + reduce, bit for bit,
    with no row written; solve reads the store as it reads a reduced one."""
    from coala_stream.solve import SolveConfig, run_solve

    model_dir, ref = plain_written
    out = tmp_path / "f.zarr"
    s = run_capture(plain_config(model_dir, out, text_file, drop_activations=True),
                    progress=False)
    assert s["raw_bytes"] == 0 and s["status"] == "complete"
    assert_same_plain(ref, out)
    from coala_stream.cli.status import render
    from coala_stream.status import store_status

    with open_store(out) as o:
        got = store_status(o)
    assert got["totals"]["dropped_chunks"] == 48 and got["totals"]["ratio"] is None
    assert got["totals"]["reduce"] == {"complete": 8}
    assert "48 chunks dropped" in render(got) and "ratio" not in render(got).split("size")[1]
    on_disk = sum(f.stat().st_size for f in (out / "reduce").rglob("*") if f.is_file())
    assert got["totals"]["reduce_bytes"] == on_disk > 0 and got["totals"]["applied_bytes"] == 0
    assert "reduce results" in render(got).split("size")[1]
    a = run_solve(ref, SolveConfig(out=str(tmp_path / "a"), ratio=0.3), progress=False)
    b = run_solve(out, SolveConfig(out=str(tmp_path / "b"), ratio=0.3), progress=False)
    assert a["totals"]["layers"] == b["totals"]["layers"] == 14
    from safetensors.torch import load_file

    wa, wb = (load_file(str(tmp_path / d / "model.safetensors")) for d in "ab")
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


def test_a_plain_fold_killed_mid_block_resumes_to_the_same_r(plain_written, text_file,
                                                             tmp_path, monkeypatch):
    """A failure after some of block 0's inputs committed further than others (each commits
    at its own group boundaries): the resumed pass starts at the fewest and skips what each
    holds."""
    model_dir, ref = plain_written
    out = tmp_path / "f.zarr"
    from coala_stream.sequential import infold

    real_write, calls = infold.write_result, []

    def write(path, part, meta):
        calls.append((meta["input"], meta["next_chunk"]))
        if len(calls) == 7:
            raise RuntimeError("injected failure")
        return real_write(path, part, meta)

    monkeypatch.setattr(infold, "write_result", write)
    with pytest.raises(RuntimeError, match="injected failure"):
        run_capture(plain_config(model_dir, out, text_file, drop_activations=True),
                    progress=False)
    with open_store(out) as o:
        committed = {o.input(n).num_chunks for n in o.inputs if ".layers.0." in n}
    assert len(committed) > 1  # uneven, as the resume must handle
    monkeypatch.undo()
    run_capture(plain_config(model_dir, out, text_file, drop_activations=True),
                progress=False)
    assert_same_plain(ref, out)
