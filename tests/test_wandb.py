"""wandb across restarts, in offline mode (no network): every start of a run directory continues
the same wandb run (its id in <run_dir>/wandb_run_id) and each step reaches wandb exactly once,
also the steps a resumed run computes again. The offline run files are read back as wandb wrote
them (LevelDB-framed protobuf records)."""

import struct
import time

import pytest

from tests.test_train import make_trainer

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2 as pb  # noqa: E402


def wandb_records(path):
    """The protobuf records of a .wandb file: a 7-byte header, then 32 KiB blocks of
    (crc32 u32, length u16, type u8) framed chunks; type 1 whole, 2/3/4 first/middle/last."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if (length == 0 and kind == 0) or pos + 7 + length > len(data):
            break  # the end, or a record still being written
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 2):
            buf = chunk
        else:
            buf += chunk
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            yield record


def wandb_runs(run_dir, timeout_s=60):
    """[(run id, [steps logged])] of each start, in order. wandb's writer is a separate process
    that may still be flushing after finish() returned: wait for each file's exit record."""
    out = []
    for f in sorted(run_dir.glob("wandb/offline-run-*/run-*.wandb")):
        deadline = time.monotonic() + timeout_s
        while True:
            ids, steps, ended = set(), [], False
            for r in wandb_records(f):
                kind = r.WhichOneof("record_type")
                if kind == "run":
                    ids.add(r.run.run_id)
                elif kind == "history":
                    steps.append(r.history.step.num)
                ended |= kind == "exit"
            if ended or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        out.append((ids.pop() if len(ids) == 1 else ids, steps))
    return out


def test_resumed_run_continues_the_same_wandb_run_without_repeating_steps(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.delenv("WANDB_RUN_ID", raising=False)
    run = tmp_path / "run"
    args = ["logging.wandb=offline", "train.lr_decay_steps=7"]
    # Steps 1-5, the last checkpoint at 3: as if killed after step 5 was logged.
    make_trainer(run, *args, "train.max_steps=5", "checkpoint.interval=3",
                 "checkpoint.save_final=false").fit()
    run_id = (run / "wandb_run_id").read_text().strip()
    # Resumes at 3: steps 4 and 5 run again (identical values) and are not sent twice.
    make_trainer(run, *args, "train.max_steps=7", "checkpoint.interval=0").fit()
    assert wandb_runs(run) == [(run_id, [1, 2, 3, 4, 5]), (run_id, [6, 7])]
    # train.resume=never starts another run: a new wandb run, from step 1.
    make_trainer(run, *args, "train.max_steps=2", "train.resume=never").fit()
    new_id = (run / "wandb_run_id").read_text().strip()
    assert new_id != run_id and wandb_runs(run)[-1] == (new_id, [1, 2])
