"""A Qwen-style tokenizer.json (byte-level BPE + Qwen's added special tokens, in Qwen's order) loads
through data/tokenizer.py and its special tokens drive the vision token layout and the model's pads."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from data.tokenizer import load_tokenizer
from model.config import load_model_config
from model.language_model import Qwen35LM
from model.vision_processing import VisualInput
from model.vision_tokens import VisionTokenIds, expand_document

# Qwen2.5 / Qwen3 / Qwen3.5 add these after the BPE vocabulary, in this order (e.g. Qwen2.5:
# <|endoftext|> = 151643, <|vision_start|> = 151652, <|image_pad|> = 151655, <|video_pad|> = 151656).
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>",
                 "<|object_ref_end|>", "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>",
                 "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]


@pytest.fixture(scope="module")
def qwen_tokenizer_json(tmp_path_factory):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    text = ["a photo of a red square next to a blue circle", "the ball rolls to the left",
            "<0.5 seconds> <1.5 seconds> <2.5 seconds>"] * 50
    tok.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=300, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    base = tok.get_vocab_size()
    tok.add_special_tokens(QWEN_SPECIALS)
    path = tmp_path_factory.mktemp("qwen_tok") / "tokenizer.json"
    tok.save(str(path))
    return path, base


def test_special_tokens_give_the_vision_ids(qwen_tokenizer_json):
    path, base = qwen_tokenizer_json
    tok = load_tokenizer(str(path))
    ids = VisionTokenIds.from_tokenizer(tok)
    assert ids == VisionTokenIds(image_pad=base + 12, video_pad=base + 13, vision_start=base + 9,
                                 vision_end=base + 10)
    assert tok.eos_id == base and tok.vocab_size == base + len(QWEN_SPECIALS)
    # A special token written in the text is that one token, as in transformers.
    assert tok.encode("<|image_pad|>") == [ids.image_pad]


def test_transformers_reads_the_same_ids(qwen_tokenizer_json):
    transformers = pytest.importorskip("transformers")
    path, _ = qwen_tokenizer_json
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert VisionTokenIds.from_tokenizer(hf_tok) == VisionTokenIds.from_tokenizer(load_tokenizer(str(path)))
    text = "a photo of a red square"
    assert hf_tok.encode(text, add_special_tokens=False) == load_tokenizer(str(path)).encode(text)


def test_layout_and_model_pads_follow_the_tokenizer(qwen_tokenizer_json):
    path, _ = qwen_tokenizer_json
    tok = load_tokenizer(str(path))
    ids = VisionTokenIds.from_tokenizer(tok)
    image = VisualInput(torch.randn(24, 1536), (1, 4, 6), "image")
    video = VisualInput(torch.randn(16, 1536), (1, 4, 4), "video", timestamps=[0.5])
    doc = expand_document(["a photo of", image, "a red square", video, "the ball"], tok)
    s = doc.input_ids
    i = s.index(ids.vision_start)
    assert s[i:i + 8] == [ids.vision_start] + [ids.image_pad] * 6 + [ids.vision_end]
    j = s.index(ids.video_pad)
    assert s[j - 1] == ids.vision_start and s[j:j + 4] == [ids.video_pad] * 4
    assert tok.decode(s[i + 8:j - 1]).endswith("<0.5 seconds>")

    # A model configured with the tokenizer's ids scatters the visual tokens into those pads.
    cfg = load_model_config("tiny_vl")
    cfg.vision = dataclasses.replace(cfg.vision, image_token_id=ids.image_pad, video_token_id=ids.video_pad,
                                     vision_start_token_id=ids.vision_start, vision_end_token_id=ids.vision_end)
    model = Qwen35LM(cfg).eval()
    input_ids = torch.tensor([s])
    with torch.no_grad():
        out = model(input_ids, pixel_values=image.pixel_values, image_grid_thw=torch.tensor([image.grid_thw]),
                    pixel_values_videos=video.pixel_values, video_grid_thw=torch.tensor([video.grid_thw]))
        emb = model.embed(input_ids, image.pixel_values, torch.tensor([image.grid_thw]),
                          video.pixel_values, torch.tensor([video.grid_thw]))
    assert out.logits.shape == (1, len(s), cfg.vocab_size)
    pads = (input_ids == ids.image_pad) | (input_ids == ids.video_pad)
    assert not torch.allclose(emb[pads], model.embed_tokens(input_ids)[pads])
    assert torch.equal(emb[~pads], model.embed_tokens(input_ids)[~pads])
