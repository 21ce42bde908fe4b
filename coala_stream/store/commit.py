"""The commit protocol of a `Store`: publishing written chunks, and undoing what a kill left.

A mixin of `base.Store` (kept apart so that the protocol reads whole on one page): it
uses the backend primitives and the reader the `Store` class declares.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import replace

from ..errors import StoreError, UsageError
from . import format as fmt
from ..signals import deferring


class CommitProtocol:
    """`commit` and `rollback` (see `Store`)."""

    @deferring
    def commit(self, samples_done: int, committed: Mapping[str, tuple[int, Sequence[int]]],
               complete: bool = False) -> None:
        """Publish written chunks: per input (committed_tokens, crc32 list of all its chunks).

        Order is the crash-safety protocol: data is already on disk, then each input's new
        checksums, then its one-attribute commit record `committed_tokens`, then the root
        `capture` record (samples_done, complete, and every input's token count). The root
        write is the commit point: a kill before it leaves inputs ahead of the root, and
        `rollback` takes them back. Everything is checked before anything is written; the
        cost is that of the new chunks (plus one small write per input), not of all chunks.
        """
        self._need_writable("commit")
        updates = {name: self._check_commit(name, int(t), crcs, complete)
                   for name, (t, crcs) in committed.items()}
        capture = dict(self._root_attrs().get("capture") or {})
        if int(samples_done) < int(capture.get("samples_done", 0)):
            raise UsageError(
                f"samples_done may not go back: committed {capture.get('samples_done')}, got {samples_done}"
            )
        if complete:  # a finished array's shape is its token count, for readers other than ours
            for name, (tokens, _) in updates.items():
                if self._rows(name) > tokens:
                    self._resize(name, tokens)
        for name, (tokens, crcs) in updates.items():
            old = self.input(name)
            self._write_crcs(name, old.num_chunks, crcs[old.num_chunks:])
            self._set_input_attrs(name, {"committed_tokens": tokens})  # one write: the input's commit
            self._committed[name] = replace(old, tokens=tokens, num_chunks=len(crcs), chunk_crc32=crcs)
        tokens = {**capture.get("tokens", {}), **{nm: t for nm, (t, _) in updates.items()}}
        capture.update(samples_done=int(samples_done), complete=bool(complete), tokens=tokens)
        self._update_root_attrs({"capture": capture})
        self._flush()

    @deferring
    def commit_folded(self, name: str, crcs: Sequence[int], samples_done: int = 0) -> None:
        """Commit whole chunks of ``name`` that were folded in memory and never written (a
        propagating capture that drops its activations: `sequential.infold`): ``crcs`` are
        the checksums of all its chunks, as `commit` takes them. The chunks are recorded as
        dropped before anything else, so no reader takes the missing rows for data; then the
        array's shape and the commit as `commit` writes it."""
        self._need_writable("commit_folded")
        info = self.input(name)
        tokens = len(crcs) * info.chunk_tokens
        self._set_input_attrs(name, {"dropped_chunks": len(crcs)})
        self._committed.pop(name, None)  # the cached record's `dropped` is stale now
        if self._rows(name) < tokens:
            self._resize(name, self._grown_rows(tokens))
        self.commit(samples_done, {name: (tokens, crcs)})

    def _check_commit(self, name: str, tokens: int, crcs: Sequence[int], complete: bool):
        info = self.input(name)
        ct, k = info.chunk_tokens, info.num_chunks
        crcs = crcs if isinstance(crcs, list) else list(crcs)  # a tuple or array compares unlike
        if len(crcs) != fmt.num_chunks(tokens, ct) or (tokens % ct and not complete):
            raise UsageError(
                f"commit of input {name!r}: {tokens} tokens need {fmt.num_chunks(tokens, ct)} crc32s "
                f"(got {len(crcs)}) and whole chunks of {ct} rows unless the capture is complete"
            )
        # The committed prefix is compared in memory (the writer's copy, no disk read), as it
        # comes: the writer passes back the ints it was given, so one list compare in C does,
        # and only the new checksums go through Python (a commit's work is its new chunks').
        prefix = crcs[:k]
        if tokens < info.tokens or (prefix != info.chunk_crc32
                                    and [int(c) & 0xFFFFFFFF for c in prefix] != info.chunk_crc32):
            raise StoreError(
                f"commit of input {name!r} would change its {info.num_chunks} committed chunks; "
                "committed data never changes: resume after the last committed chunk"
            )
        if tokens > self._rows(name):
            raise StoreError(
                f"commit of input {name!r}: {tokens} tokens committed but only {self._rows(name)} rows "
                "written; write the chunks before committing them"
            )
        return tokens, info.chunk_crc32 + [int(c) & 0xFFFFFFFF for c in crcs[k:]]

    @deferring
    def rollback(self) -> dict:
        """Undo what a killed capture left uncommitted; run on resume before writing.

        Takes every input back to the root commit record (an input whose commit record a
        killed `commit` already advanced), shrinks every array to its committed rows, drops
        checksums beyond them and deletes leftover `*.partial` temporaries. Idempotent, and
        safe to kill and rerun.
        Returns {"rows_dropped": {name: rows}, "partial_files_removed": k}.
        """
        self._need_writable("rollback")
        removed = self._remove_partials()
        self._remove_half_created()
        self._committed.clear()
        root_tokens = (self._root_attrs().get("capture") or {}).get("tokens", {})
        dropped = {}
        for name in self._input_names():
            committed = self._rewind_commit(name, int(root_tokens.get(name, 0)))
            rows = self._rows(name)
            if rows < committed:
                raise StoreError(
                    f"input {name!r} has {committed} committed tokens but only {rows} rows: the store "
                    "was modified outside coala-stream; recapture with --overwrite"
                )
            if rows > committed:
                self._drop_rows(name, committed, rows)
                dropped[name] = rows - committed
        self._flush()
        return {"rows_dropped": dropped, "partial_files_removed": removed}

    def _rewind_commit(self, name: str, root_tokens: int) -> int:
        """Set the input's commit back to the root record's count if a killed commit advanced it."""
        info = self.input(name)
        if info.tokens < root_tokens:
            raise StoreError(
                f"input {name!r} has {info.tokens} committed tokens, the root record says {root_tokens}: "
                "the store was modified outside coala-stream; recapture with --overwrite"
            )
        k = fmt.num_chunks(root_tokens, info.chunk_tokens)
        if info.tokens > root_tokens:
            self._set_input_attrs(name, {"committed_tokens": root_tokens})
            self._committed[name] = replace(info, tokens=root_tokens, num_chunks=k,
                                            chunk_crc32=info.chunk_crc32[:k])
        self._truncate_crcs(name, k)
        return root_tokens

    def _drop_rows(self, name: str, committed: int, rows: int) -> None:
        self._resize(name, committed)
