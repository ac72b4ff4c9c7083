"""Text features from a caption store, cached per (encoder, caption hash)."""

from __future__ import annotations

from datetime import UTC, datetime

import torch

from manifests.caption_store import StoreMeta, read_store, write_fragment
from segmenter.text import TextEncoder, TextFeatureCache, expert_text_features
from tests.helpers import row

META = StoreMeta(["a"], "tiny", 0.55)


def make_store(path, caption_b="roofs and a road"):
    rows = [
        row("t1", "p1", caption="trees", expert="annotation", similarity=0.7),
        row("t1", "p2", caption="a lawn", expert="annotation", similarity=0.7),
        row("t1", "p1", caption=caption_b, expert="qwen", similarity=0.7),
        row("t2", "p1", caption="cars", expert="qwen", similarity=0.7),
        row("t2", "p1", caption="rejected", expert="annotation", similarity=0.3, passed=False),
    ]
    for item in rows:
        item["created_at"] = datetime.now(UTC)
    write_fragment(path, rows, META)
    return path


def test_store_features_pool_per_expert_and_mask_missing(tmp_path):
    encoder = TextEncoder("test-tiny-clip")
    cache = TextFeatureCache(tmp_path / "cache", encoder)
    features = expert_text_features(make_store(tmp_path / "store"), ["annotation", "qwen", "llava"], cache)
    vectors, present = features.lookup("t1")
    assert present.tolist() == [True, True, False] and vectors.shape == (3, 32)
    expected = torch.nn.functional.normalize(encoder.encode(["trees", "a lawn"]).mean(0), dim=0)
    torch.testing.assert_close(vectors[0], expected)
    assert (vectors[2] == 0).all()
    assert features.lookup("t2")[1].tolist() == [False, True, False]  # the failed caption is left out
    assert features.lookup("unknown")[1].tolist() == [False, False, False]
    assert features.masked_counts(["t1", "t2", "unknown"]) == {"annotation": 2, "qwen": 1, "llava": 3}
    assert not any(parameter.requires_grad for parameter in encoder.parameters())  # frozen, never trained


def test_encoding_twice_runs_the_encoder_once_and_an_edit_invalidates_one_entry(tmp_path):
    encoder = TextEncoder("test-tiny-clip")
    store = make_store(tmp_path / "store")
    expert_text_features(store, ["annotation", "qwen"], TextFeatureCache(tmp_path / "cache", encoder))
    assert encoder.calls == 1
    again = TextFeatureCache(tmp_path / "cache", encoder)  # a new process would read the same folder
    assert len(again) == 4
    expert_text_features(store, ["annotation", "qwen"], again)
    assert encoder.calls == 1
    edited = make_store(tmp_path / "store2", caption_b="roofs and two roads")
    encoded = []
    original = encoder.encode
    encoder.encode = lambda texts: (encoded.extend(texts), original(texts))[1]
    expert_text_features(edited, ["annotation", "qwen"], again)
    assert encoded == ["roofs and two roads"] and len(again) == 5


def test_direction_variants_encode_the_rewritten_captions(tmp_path):
    encoder = TextEncoder("test-tiny-clip")
    store = make_store(tmp_path / "store", caption_b="two buildings in the north-west, a road on the left")
    cache = TextFeatureCache(tmp_path / "cache", encoder)
    features = expert_text_features(store, ["annotation", "qwen"], cache, direction_variants=True)
    assert features.n_variants == 8
    # one counter-clockwise quarter turn moves the north-west to the south-west and the left side to the bottom
    turned = encoder.encode(["two buildings in the south-west, a road on the bottom"])[0]
    torch.testing.assert_close(features.lookup("t1", 1)[0][1], torch.nn.functional.normalize(turned, dim=0))
    plain = expert_text_features(store, ["annotation", "qwen"], cache)
    torch.testing.assert_close(features.lookup("t1", 0)[0], plain.lookup("t1")[0])
    assert not torch.allclose(features.lookup("t1", 1)[0][1], plain.lookup("t1")[0][1])


def test_the_segmenter_reads_the_rows_the_gate_marked(tmp_path):
    """Which selected captions count is read from the store's ``usable`` and ``passed`` columns, never re-derived
    from the text: a row the gate marked unusable stays out even where it holds text."""
    rows = [
        row("t1", caption="passed", expert="qwen", similarity=0.7),
        row("t2", caption="kept but failed the gate", expert="qwen", similarity=0.3, passed=False),
        row("t3", caption="cut off by an error", expert="qwen", similarity=None, usable=False, error="timeout"),
        row("t4", caption=None, expert="qwen", similarity=None),
    ]
    store = tmp_path / "store"
    write_fragment(store, rows, META)
    cache = TextFeatureCache(tmp_path / "cache", TextEncoder("test-tiny-clip"))
    marked = read_store(store).set_index("tile_id")
    for passed_only, column in ((True, "passed"), (False, "usable")):
        features = expert_text_features(store, ["qwen"], cache, passed_only=passed_only)
        read = {tile for tile in marked.index if features.lookup(tile)[1].item()}
        assert read == set(marked.index[marked[column]]), passed_only
    assert read == {"t1", "t2"}
