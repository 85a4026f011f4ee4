"""M-RoPE positions: hand-worked examples, packed documents, and transformers' Qwen3.5
`get_rope_index` on single documents."""

import random
import types

import pytest
import torch

from model.mrope import mrope_position_ids
from tests.vision_fixtures import IMG, VE, VID, VS


def positions(ids, image_grids=None, video_grids=None, cu=None):
    ids = torch.tensor(ids)
    ids = ids[None] if ids.dim() == 1 else ids
    g = lambda x: None if x is None else torch.tensor(x)  # noqa: E731
    return mrope_position_ids(ids, g(image_grids), g(video_grids), g(cu), image_token_id=IMG,
                              video_token_id=VID, spatial_merge_size=2)


def test_text_image_text():
    # "a b" + image of 2x3 merged tokens (grid 1x4x6) + "c d".
    ids = [10, 11, VS] + [IMG] * 6 + [VE, 12, 13]
    pos = positions(ids, [[1, 4, 6]])[:, 0]
    # Text 0..2 (vision_start is text); the image starts at s = 3: t = 3, h = 3 + row, w = 3 + col;
    # then text continues at max + 1 = 3 + max(2, 3) = 6.
    assert pos[0].tolist() == [0, 1, 2, 3, 3, 3, 3, 3, 3, 6, 7, 8]
    assert pos[1].tolist() == [0, 1, 2, 3, 3, 3, 4, 4, 4, 6, 7, 8]
    assert pos[2].tolist() == [0, 1, 2, 3, 4, 5, 3, 4, 5, 6, 7, 8]


def test_video_with_three_temporal_patches():
    # Per temporal patch: timestamp text (2 tokens here) + start + 2x2 merged pads + end.
    ts = [20, 21]
    ids = [10] + sum([ts + [VS] + [VID] * 4 + [VE] for _ in range(3)], []) + [11]
    pos = positions(ids, video_grids=[[3, 4, 4]])[:, 0]
    t, h, w = pos.tolist()
    # doc: 10@0, ts@1,2, start@3, block s=4 (t=4, h 4,4,5,5, w 4,5,4,5), end@6, ts@7,8, start@9,
    # block s=10, end@12, ts@13,14, start@15, block s=16, end@18, 11@19.
    assert t == [0, 1, 2, 3, 4, 4, 4, 4, 6, 7, 8, 9, 10, 10, 10, 10, 12, 13, 14, 15, 16, 16, 16, 16, 18, 19]
    assert h == [0, 1, 2, 3, 4, 4, 5, 5, 6, 7, 8, 9, 10, 10, 11, 11, 12, 13, 14, 15, 16, 16, 17, 17, 18, 19]
    assert w == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 10, 11, 10, 11, 12, 13, 14, 15, 16, 17, 16, 17, 18, 19]


def test_two_documents_packed_restart_and_rows():
    doc_a = [10, VS] + [IMG] * 4 + [VE, 11]         # image grid 1x4x4 -> 2x2 merged
    doc_b = [12, 13, VS] + [IMG] * 2 + [VE, 14]     # image grid 1x2x4 -> 1x2 merged
    doc_c = [15, 16, 17]
    row0 = doc_a + doc_b                             # 8 + 7 = 15 tokens
    row1 = doc_c + [0] * 12
    cu = [0, 8, 15, 18, 30]
    pos = positions([row0, row1], [[1, 4, 4], [1, 2, 4]], cu=cu)
    a = pos[:, 0, :8].tolist()
    assert a == [[0, 1, 2, 2, 2, 2, 4, 5], [0, 1, 2, 2, 3, 3, 4, 5], [0, 1, 2, 3, 2, 3, 4, 5]]
    b = pos[:, 0, 8:].tolist()  # restarts at 0; the 1x2 block spans max(1, 2) = 2 positions
    assert b == [[0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 3, 5, 6], [0, 1, 2, 3, 4, 5, 6]]
    assert pos[:, 1, :3].tolist() == [[0, 1, 2]] * 3
    assert pos[:, 1, 3:].tolist() == [list(range(12))] * 3  # the padding segment is its own document


def test_text_only_equals_position_in_document():
    ids = torch.randint(10, 100, (2, 12))
    cu = torch.tensor([0, 5, 12, 20, 24])
    pos = mrope_position_ids(ids, cu_seqlens=cu, image_token_id=IMG, video_token_id=VID)
    from model.context import segment_layout

    assert torch.equal(pos, segment_layout(cu, 2, 12)[1].expand(3, -1, -1))


def test_count_mismatch_names_the_row():
    ids = [[10, VS] + [IMG] * 6 + [VE], [10, VS] + [IMG] * 3 + [VE, 11, 12, 13]]
    with pytest.raises(ValueError, match=r"batch row 1: a visual block of merged grid \(1, 2, 2\) "
                                         r"needs 4 contiguous pad tokens"):
        positions(ids, [[1, 4, 6], [1, 4, 4]])
    with pytest.raises(ValueError, match=r"batch row 0: 6 pad tokens .* beyond the 0 visual blocks"):
        positions(ids[:1])


def hf_rope_index(ids, image_grids, video_grids):
    from transformers.models.qwen3_5.modeling_qwen3_5 import Qwen3_5Model

    # get_rope_index only reads the merge size and calls get_vision_position_ids, which does not
    # touch `self`: no model (and no weights) needed.
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(vision_config=types.SimpleNamespace(spatial_merge_size=2)),
        get_vision_position_ids=lambda *a, **k: Qwen3_5Model.get_vision_position_ids(None, *a, **k))
    types_ = torch.zeros_like(ids)
    types_[ids == IMG] = 1
    types_[ids == VID] = 2
    return Qwen3_5Model.get_rope_index(fake, ids, types_, image_grids, video_grids)[0]


def random_document(rng):
    """Interleaved text, images and videos with their grids, laid out as the processor does."""
    ids, images, videos = [], [], []
    for _ in range(rng.randint(1, 5)):
        ids += [rng.randint(10, 99) for _ in range(rng.randint(0, 4))]
        if rng.random() < 0.5:
            g = [1, 2 * rng.randint(1, 5), 2 * rng.randint(1, 5)]
            images.append(g)
            ids += [VS] + [IMG] * (g[1] * g[2] // 4) + [VE]
        else:
            g = [rng.randint(1, 4), 2 * rng.randint(1, 3), 2 * rng.randint(1, 4)]
            videos.append(g)
            for _ in range(g[0]):
                ids += [rng.randint(10, 99) for _ in range(3)] + [VS] + [VID] * (g[1] * g[2] // 4) + [VE]
    ids += [rng.randint(10, 99) for _ in range(rng.randint(0, 3))]
    return ids, images, videos


def test_agrees_with_transformers_get_rope_index():
    rng = random.Random(0)
    for _ in range(30):
        ids, images, videos = random_document(rng)
        ids_t = torch.tensor([ids])
        ig = torch.tensor(images) if images else None
        vg = torch.tensor(videos) if videos else None
        ref = hf_rope_index(ids_t, ig, None if vg is None else vg.clone())
        ours = mrope_position_ids(ids_t, ig, vg, image_token_id=IMG, video_token_id=VID)
        assert torch.equal(ours, ref), (ids, images, videos)


def test_packed_documents_equal_each_document_alone():
    rng = random.Random(1)
    docs = [random_document(rng) for _ in range(4)]
    ids = sum((d[0] for d in docs), [])
    images = sum((d[1] for d in docs), [])
    videos = sum((d[2] for d in docs), [])
    cu = torch.tensor([0] + [len(d[0]) for d in docs]).cumsum(0)
    packed = positions(ids, images or None, videos or None, cu=cu.tolist())[:, 0]
    alone = torch.cat([positions(d[0], d[1] or None, d[2] or None)[:, 0] for d in docs], dim=1)
    assert torch.equal(packed, alone)
