"""What hostile data and wrong resumes must not do: crash the trainer, loop forever, or resume
silently on other data."""

import shutil

import pytest

from data import build_loader
from data.config import DataConfig
from data.synthetic import write_synthetic

SMALL = dict(name="webdataset", seq_len=128, batch_size=4, image_min_pixels=1024,
             video_min_pixels=1024, shuffle_buffer=8)


@pytest.fixture(scope="module")
def syn(tmp_path_factory):
    d = tmp_path_factory.mktemp("syn")
    write_synthetic(str(d), seed=3, num_shards=3, docs_per_shard=12)
    return d


def test_resume_with_another_shard_list_is_refused(syn, tmp_path):
    """Same count, other files or another order: the stream positions would point elsewhere."""
    names = [f"shard-{i:06d}.tar" for i in range(3)]
    loader = build_loader(DataConfig(**SMALL, shards="::".join(str(syn / n) for n in names)))
    next(loader)
    state = loader.state_dict()
    moved = tmp_path / "moved"
    moved.mkdir()
    for n in names:
        shutil.copy(syn / n, moved / n)
    for spec in ("::".join(str(syn / n) for n in reversed(names)),   # reordered
                 "::".join(str(moved / n) for n in names)):          # other files
        other = build_loader(DataConfig(**SMALL, shards=spec))
        with pytest.raises(ValueError, match=r"data.shards: the shard list differs .*"
                                             r"data.allow_changed_shards=true"):
            other.load_state_dict(state)
        allowed = build_loader(DataConfig(**SMALL, shards=spec, allow_changed_shards=True))
        allowed.load_state_dict(state)
        next(allowed)
    same = build_loader(DataConfig(**SMALL, shards="::".join(str(syn / n) for n in names)))
    same.load_state_dict(state)
    next(same)
