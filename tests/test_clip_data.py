"""The image-text pairs the tiny CLIP trains on (captions, plus "a photo of a [word]" prompts)."""

from __future__ import annotations

from captioning.data import load_dataset
from captioning.models.lightcap.concepts_data import caption_pairs


def test_caption_pairs_are_deterministic_and_mix_in_concept_prompts(synth_data):
    corpus = load_dataset(synth_data)
    pairs = caption_pairs(corpus, "train")
    assert len(pairs.records) == len(corpus.split("train"))
    # each image's words: its boxes' concept words and its label words
    rec = pairs.records[0]
    boxed = {b.concept for b in corpus.boxes[rec.imgid]}
    assert boxed <= set(pairs.concepts[0])
    same = [pairs.caption_for(i, 0, 3, prompt_prob=0.5) for i in range(len(pairs.records))]
    assert same == [pairs.caption_for(i, 0, 3, prompt_prob=0.5) for i in range(len(pairs.records))]
    assert same != [pairs.caption_for(i, 0, 4, prompt_prob=0.5) for i in range(len(pairs.records))]
    prompts = [t for t in same if t.startswith("a photo of a ")]
    assert 0.2 * len(same) < len(prompts) < 0.8 * len(same)
    for i, text in enumerate(same):
        if text.startswith("a photo of a "):
            assert text[len("a photo of a "):] in pairs.concepts[i]
        else:
            assert text in pairs.captions[i]
    assert all(not pairs.caption_for(i, 0, 3).startswith("a photo of a ") or "photo" in " ".join(pairs.captions[i])
               for i in range(len(pairs.records)))
