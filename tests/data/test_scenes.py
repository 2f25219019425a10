"""The synthetic scenes world: determinism, captions agree with the pixels, held-out pairs, perturbations."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

from alignfuse.data.scenes import (
    COLOURS,
    HELD_OUT_PAIRS,
    SHAPES,
    SceneObject,
    SceneSpec,
    attribute_caption,
    caption_matches,
    caption_scene,
    claim_holds,
    generate_scenes,
    parse_caption,
    perturb_caption,
    relation_holds,
    render_scene,
    sample_scene,
    sample_scenes,
)
from alignfuse.errors import InvalidInputError


def _digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_same_seed_gives_identical_bytes(tmp_path: Path) -> None:
    a = generate_scenes(tmp_path / "a", seed=7, count=12, split="train", size=64)
    b = generate_scenes(tmp_path / "b", seed=7, count=12, split="train", size=64)
    assert _digest(a.parent) == _digest(b.parent)
    c = generate_scenes(tmp_path / "c", seed=8, count=12, split="train", size=64)
    assert _digest(a.parent) != _digest(c.parent)
    d = generate_scenes(tmp_path / "d", seed=7, count=12, split="val", size=64)
    assert json.loads(a.read_text()) != json.loads(d.read_text())


def test_json_is_karpathy_style_with_groups(tmp_path: Path) -> None:
    path = generate_scenes(tmp_path, seed=1, count=20, split="test", size=64)
    entries = json.loads(path.read_text())
    assert len(entries) == 20
    for e in entries:
        assert (tmp_path / e["image"]).is_file()
        assert e["image"].startswith("images/") and e["image"].endswith(".png")
        assert len(e["caption"]) == 5 and all(isinstance(c, str) and c for c in e["caption"])
        assert isinstance(e["group"], int)
        assert 1 <= len(e["objects"]) <= 3
    groups: dict[int, list[dict]] = {}
    for e in entries:
        groups.setdefault(e["group"], []).append(e)
    multi = [g for g in groups.values() if len(g) > 1]
    assert multi, "scenes come in groups of hard negatives"
    for members in multi:
        colours = {frozenset(o["colour"] for o in m["objects"]) for m in members}
        shapes = {frozenset(o["shape"] for o in m["objects"]) for m in members}
        assert len(shapes) == 1, "group members share their shapes"
        if len(members[0]["objects"]) > 1:
            assert len(colours) == 1, "group members share their colours (bound or arranged differently)"
        assert len({json.dumps(m["objects"]) for m in members}) == len(members)


def _centroid(arr: np.ndarray, colour: tuple[int, int, int]) -> tuple[float, float, int]:
    dist = np.abs(arr.astype(np.int32) - np.array(colour)[None, None, :]).sum(axis=2)
    ys, xs = np.nonzero(dist < 40)
    return (float(xs.mean()) if len(xs) else -1.0, float(ys.mean()) if len(ys) else -1.0, len(xs))


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_captions_agree_with_pixels(seed: int) -> None:
    rng = np.random.default_rng(seed)
    size = 96
    checked_relations = 0
    for _ in range(25):
        spec = sample_scene(rng, "train")
        img = np.asarray(render_scene(spec, size))
        assert img.shape == (size, size, 3)
        for obj in spec.objects:  # every object's colour is drawn at its centre
            px = img[int(obj.y * size), int(obj.x * size)].astype(int)
            assert np.abs(px - np.array(COLOURS[obj.colour])).sum() < 40, (obj, px)
        captions = caption_scene(spec, rng)
        assert len(captions) == 5
        for cap in captions:
            claim = parse_caption(cap)
            assert claim.mentions, cap
            assert claim_holds(claim, spec.objects), cap
            for m in claim.mentions:  # the mentioned colour is in the picture
                assert _centroid(img, COLOURS[m.colour])[2] > 20, (cap, m)
            if claim.relation is not None and claim.mentions[0].colour != claim.mentions[1].colour:
                a = [o for o in spec.objects if o.colour == claim.mentions[0].colour]
                b = [o for o in spec.objects if o.colour == claim.mentions[1].colour]
                if len(a) == 1 and len(b) == 1 and len({o.colour for o in spec.objects}) == len(spec.objects):
                    # relation measured in pixels: centroids of the two colours
                    xa, ya, _ = _centroid(img, COLOURS[a[0].colour])
                    xb, yb, _ = _centroid(img, COLOURS[b[0].colour])
                    pa = SceneObject("circle", "red", "small", xa / size, ya / size, 0.1)
                    pb = SceneObject("circle", "red", "small", xb / size, yb / size, 0.1)
                    assert relation_holds(pa, pb, claim.relation), (cap, (xa, ya), (xb, yb))
                    checked_relations += 1
    assert checked_relations > 5


def test_compositional_split_has_only_held_out_pairs_and_train_none() -> None:
    train = sample_scenes(3, 400, "train") + sample_scenes(3, 200, "val") + sample_scenes(3, 200, "test")
    train_pairs = {(o.colour, o.shape) for s in train for o in s.objects}
    assert not train_pairs & HELD_OUT_PAIRS
    assert len(train_pairs) == len(COLOURS) * len(SHAPES) - len(HELD_OUT_PAIRS)
    comp = sample_scenes(3, 200, "compositional")
    assert all(any((o.colour, o.shape) in HELD_OUT_PAIRS for o in s.objects) for s in comp)
    comp_pairs = {(o.colour, o.shape) for s in comp for o in s.objects}
    assert comp_pairs & HELD_OUT_PAIRS == HELD_OUT_PAIRS


def test_perturbed_captions_are_false_and_minimal() -> None:
    rng = np.random.default_rng(5)
    made = 0
    for spec in sample_scenes(4, 80, "train"):
        for cap in caption_scene(spec, rng):
            neg = perturb_caption(cap, spec.objects, rng)
            if neg is None:
                continue
            made += 1
            assert not caption_matches(neg, spec.objects), (cap, neg)
            assert len(neg.split()) == len(cap.split())
            diff = sum(a != b for a, b in zip(cap.split(), neg.split(), strict=True))
            assert 1 <= diff <= 4, (cap, neg)  # a word swap/replacement (+ their articles)
    assert made > 200


def test_relation_swap_is_a_negative() -> None:
    a = SceneObject("circle", "red", "large", 0.25, 0.5, 0.15)
    b = SceneObject("square", "blue", "small", 0.75, 0.5, 0.1)
    assert caption_matches("a red circle left of a blue square", [a, b])
    assert caption_matches("a blue square to the right of a red circle", [a, b])
    assert not caption_matches("a red circle right of a blue square", [a, b])
    assert not caption_matches("a blue circle left of a red square", [a, b])
    assert not caption_matches("two red circles", [a, b])
    assert caption_matches("a large red circle and a small blue square", [a, b])
    assert not caption_matches("a small red circle and a small blue square", [a, b])


def test_render_is_pure_and_validates() -> None:
    spec = SceneSpec((SceneObject("star", "yellow", "large", 0.5, 0.5, 0.2),), (120, 120, 120), 3)
    assert render_scene(spec, 64).tobytes() == render_scene(spec, 64).tobytes()
    with pytest.raises(InvalidInputError):
        render_scene(spec, 8)
    with pytest.raises(InvalidInputError):
        sample_scenes(0, 5, "nope")


def test_easy_perturbations_name_something_absent() -> None:
    rng = np.random.default_rng(9)
    made = 0
    for spec in sample_scenes(6, 40, "train"):
        present = {o.colour for o in spec.objects} | {o.shape for o in spec.objects}
        for cap in caption_scene(spec, rng)[:2]:
            neg = perturb_caption(cap, spec.objects, rng, easy=1.0)
            if neg is None:
                continue
            made += 1
            assert not caption_matches(neg, spec.objects)
            new_words = {w.removesuffix("es") if w == "crosses" else w.rstrip("s") for w in neg.split()}
            new_words -= {w.removesuffix("es") if w == "crosses" else w.rstrip("s") for w in cap.split()}
            assert new_words and not new_words & present, (cap, neg)
    assert made > 40


def test_perturbations_never_mention_a_pair_the_training_images_lack() -> None:
    """Held-out (colour, shape) pairs never occur in training images; if perturbed negatives mentioned
    them, they would occur *only* as negatives and the ITM head would learn to reject them (it did: the
    first shipped model accepted 23% of the true captions of the compositional split)."""
    specs = sample_scenes(7, 120, "train")
    seen = {(o.colour, o.shape) for s in specs for o in s.objects}
    assert not seen & HELD_OUT_PAIRS
    rng = np.random.default_rng(11)
    leaks = {"free": 0, "allowed": 0}
    made = 0
    for spec in specs:
        for cap in caption_scene(spec, rng):
            for mode in ("free", "allowed"):
                neg = perturb_caption(
                    cap, spec.objects, rng, easy=0.3, allowed_pairs=seen if mode == "allowed" else None
                )
                if neg is None:
                    continue
                made += mode == "allowed"
                assert not caption_matches(neg, spec.objects)
                mentioned = {(m.colour, m.shape) for m in parse_caption(neg).mentions}
                leaks[mode] += bool(mentioned - seen)
    assert made > 300
    assert leaks["allowed"] == 0
    assert leaks["free"] > 0  # without the restriction the leak is real, so the check above can fail


def test_attribute_captions_are_true_or_false_as_asked_and_agree_with_pixels() -> None:
    """Captions naming one attribute alone ("a red shape", "a triangle") are training data for the matching
    head; they must be exactly as true as requested, parse back into the same claim, and a true colour claim
    must be visible in the rendered pixels."""
    rng = np.random.default_rng(7)
    kinds = {"colour": 0, "shape": 0}
    for _ in range(150):
        spec = sample_scene(rng, "train")
        img = np.asarray(render_scene(spec, 96))
        for true in (True, False):
            cap = attribute_caption(spec.objects, rng, true=true)
            assert cap is not None
            claim = parse_caption(cap)
            assert not claim.mentions and len(claim.attributes) == 1, cap
            colour, shape = claim.attributes[0]
            assert (colour is None) != (shape is None), cap
            kinds["colour" if colour else "shape"] += 1
            assert caption_matches(cap, spec.objects) is true, (cap, spec.objects)
            if colour is not None:
                visible = _centroid(img, COLOURS[colour])[2] > 20
                assert visible is true, (cap, spec.objects)
            else:
                assert any(o.shape == shape for o in spec.objects) is true
    assert min(kinds.values()) > 100, kinds


def test_attribute_claims_need_some_object_with_the_attribute() -> None:
    objs = [
        SceneObject("circle", "red", "small", 0.3, 0.3, 0.14),
        SceneObject("square", "blue", "large", 0.7, 0.7, 0.2),
    ]
    assert caption_matches("a red shape", objs) and caption_matches("something blue", objs)
    assert caption_matches("there is a square", objs) and caption_matches("a picture of a circle", objs)
    assert not caption_matches("an orange object", objs) and not caption_matches("a triangle", objs)
    # full mentions keep their meaning (exact counts, binding); a bare "shape" is no claim at all
    assert caption_matches("a red circle", objs) and not caption_matches("a red square", objs)
    assert not caption_matches("two shapes", objs) and not caption_matches("a shape", objs)
