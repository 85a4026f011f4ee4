"""Reading wandb's offline run files back (LevelDB-framed protobuf records), for the tests that
check what reached wandb: tests/test_wandb.py, tests/test_slurm.py."""

import struct
import time

from wandb.proto import wandb_internal_pb2 as pb


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
