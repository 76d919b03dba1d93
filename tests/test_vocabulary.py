"""The object vocabulary: COCO tables, pluralize, caption mentions, mention_table.

Expected values are written by hand (spans from str.index on the hand-written
caption, COCO ids from the official 2017 annotation files).
"""

from __future__ import annotations

import polars as pl
import pytest

from spur_assets.core.data import vocabulary
from spur_assets.core.data.vocabulary import (
    COCO_CATEGORIES,
    COCO_CATEGORY_IDS,
    COCO_SUPERCATEGORIES,
    SYNONYMS,
    Mention,
    find_mentions,
    mention_table,
    mentioned_categories,
    pluralize,
    register_categories,
)


def spans(caption: str) -> list[tuple[str, str, int, int]]:
    return [(m.category, m.text, m.start, m.end) for m in find_mentions(caption)]


# ----------------------------------------------------------------- COCO tables


def test_eighty_categories_with_official_ids_and_gaps():
    assert len(COCO_CATEGORIES) == 80 == len(set(COCO_CATEGORIES))
    assert set(COCO_CATEGORY_IDS) == set(COCO_CATEGORIES) == set(COCO_SUPERCATEGORIES)
    # Hand-checked against instances_val2017.json.
    assert COCO_CATEGORY_IDS["person"] == 1
    assert COCO_CATEGORY_IDS["bicycle"] == 2
    assert COCO_CATEGORY_IDS["dog"] == 18
    assert COCO_CATEGORY_IDS["frisbee"] == 34
    assert COCO_CATEGORY_IDS["dining table"] == 67
    assert COCO_CATEGORY_IDS["hair drier"] == 89
    assert COCO_CATEGORY_IDS["toothbrush"] == 90
    # The ten ids COCO-2017 skips: street sign, hat, shoe, eye glasses, plate,
    # mirror, window, desk, door, blender.
    assert set(range(1, 91)) - set(COCO_CATEGORY_IDS.values()) == {12, 26, 29, 30, 45, 66, 68, 69, 71, 83}
    # Tuple in id order, as the annotation files list them.
    assert list(COCO_CATEGORIES) == sorted(COCO_CATEGORIES, key=COCO_CATEGORY_IDS.__getitem__)
    for name in ("traffic light", "sports ball", "hot dog", "potted plant", "cell phone", "teddy bear"):
        assert name in COCO_CATEGORIES


def test_supercategory_sizes_match_coco():
    sizes: dict[str, int] = {}
    for supercategory in COCO_SUPERCATEGORIES.values():
        sizes[supercategory] = sizes.get(supercategory, 0) + 1
    assert sizes == {
        "person": 1, "vehicle": 8, "outdoor": 5, "animal": 10, "accessory": 5, "sports": 10,
        "kitchen": 7, "food": 10, "furniture": 6, "electronic": 6, "appliance": 5, "indoor": 7,
    }
    assert COCO_SUPERCATEGORIES["dog"] == "animal"
    assert COCO_SUPERCATEGORIES["frisbee"] == "sports"
    assert COCO_SUPERCATEGORIES["hot dog"] == "food"


def test_every_coco_category_has_synonyms_led_by_its_name():
    assert set(COCO_CATEGORIES) <= set(SYNONYMS)
    for category in COCO_CATEGORIES:
        expected_first = "ski" if category == "skis" else category
        assert SYNONYMS[category][0] == expected_first
    assert {"puppy", "pup", "doggy"} <= set(SYNONYMS["dog"])
    assert {"man", "woman", "boy", "girl", "child", "kid", "guy", "lady", "player", "skier", "surfer"} <= set(
        SYNONYMS["person"]
    )


# ----------------------------------------------------------------- pluralize


@pytest.mark.parametrize(
    ("singular", "plural"),
    [
        ("dog", "dogs"), ("bus", "buses"), ("knife", "knives"), ("man", "men"),
        ("person", "people"), ("child", "children"), ("sheep", "sheep"), ("mouse", "mice"),
        ("hot dog", "hot dogs"), ("puppy", "puppies"), ("boy", "boys"), ("trolley", "trolleys"),
        ("woman", "women"), ("policeman", "policemen"), ("doberman", "dobermans"),
        ("giraffe", "giraffes"), ("chef", "chefs"), ("calf", "calves"), ("thief", "thieves"),
        ("bench", "benches"), ("box", "boxes"), ("glass", "glasses"), ("stomach", "stomachs"),
        ("tomato", "tomatoes"), ("piano", "pianos"), ("ox", "oxen"), ("goose", "geese"),
        ("scissors", "scissors"), ("aircraft", "aircraft"), ("cell phone", "cell phones"),
        ("wine glass", "wine glasses"), ("hot-dog", "hot-dogs"), ("Dog", "Dogs"), ("TV", "TVS"),
        ("grandchild", "grandchildren"), ("pocketknife", "pocketknives"),
    ],
)
def test_pluralize(singular, plural):
    assert pluralize(singular) == plural


def test_pluralize_refuses_blank():
    with pytest.raises(ValueError, match="non-empty noun"):
        pluralize("  ")


# ----------------------------------------------------------------- find_mentions


def test_hot_dog_is_food_and_dog_is_dog_with_spans():
    caption = "A hot dog on a plate next to a dog."
    dog_at = caption.rindex("dog")
    assert spans(caption) == [
        ("hot dog", "hot dog", 2, 9),
        ("dog", "dog", dog_at, dog_at + 3),
    ]
    assert mentioned_categories(caption) == frozenset({"hot dog", "dog"})


@pytest.mark.parametrize(
    ("caption", "expected"),
    [
        ("Two men riding horses", {"person", "horse"}),
        ("three knives on a cutting board", {"knife"}),
        ("sheep grazing on a hill", {"sheep"}),
        ("Children and their mothers", {"person"}),
        ("a puppy chasing a kitten", {"dog", "cat"}),
        ("A doggie with a frisbee", {"dog", "frisbee"}),
        ("a herd of oxen", {"cow"}),
        ("Café table with a laptop!!", {"dining table", "laptop"}),
        ("a dog's frisbee", {"dog", "frisbee"}),
        ("the dogs' frisbees", {"dog", "frisbee"}),
        ("A HOT-DOG with mustard", {"hot dog"}),
        ("a hot\u2011dog and a hot  dog", {"hot dog"}),
        ("a teddy bear on a bed", {"teddy bear", "bed"}),
        ("a brown bear in the woods", {"bear"}),
        ("a man swinging a baseball bat", {"person", "baseball bat"}),
        ("a batter holds his bat", {"person", "baseball bat"}),
        ("a fire hydrant by a stop sign", {"fire hydrant", "stop sign"}),
        ("a sports ball and a tennis racket", {"sports ball", "tennis racket"}),
        ("a cellphone and a cell phone", {"cell phone"}),
        ("a motor bike parked by a street light", {"motorcycle", "traffic light"}),
        ("two wine glasses on a table", {"wine glass", "dining table"}),
        ("a glass door", set()),
        ("a woman wearing glasses", {"person"}),
        ("dogma of the cathedral", set()),
        ("catalogue of hotels", set()),
        ("", set()),
    ],
)
def test_mentioned_categories(caption, expected):
    assert mentioned_categories(caption) == frozenset(expected)


def test_hotdog_stand_is_hot_dog_not_dog():
    # Decision (module docstring): "hotdog" is a spelling of "hot dog".
    assert spans("a hotdog stand") == [("hot dog", "hotdog", 2, 8)]


def test_chair_context_rules():
    # baby + animal is the animal, not a person
    assert spans("a baby elephant") == [("elephant", "baby elephant", 2, 15)]
    assert mentioned_categories("a baby animal next to a baby") == frozenset({"person"})
    # passenger + vehicle is the vehicle
    assert mentioned_categories("a passenger jet at the gate") == frozenset({"airplane"})
    # train tracks are not a train, but a train on them is
    assert mentioned_categories("empty train tracks") == frozenset()
    caption = "a train on the train tracks"
    assert spans(caption) == [("train", "train", 2, 7)]
    # toilet seat is the toilet; "seat" beside a toilet is not a chair
    assert mentioned_categories("a toilet seat left up") == frozenset({"toilet"})
    assert mentioned_categories("the seat of the toilet is up") == frozenset({"toilet"})
    assert mentioned_categories("a seat by the window") == frozenset({"chair"})
    assert mentioned_categories("a toilet next to a chair") == frozenset({"toilet", "chair"})
    # bow tie is a tie
    assert spans("a man in a bow tie")[1] == ("tie", "bow tie", 11, 18)


def test_orange_as_colour_is_not_the_fruit():
    assert mentioned_categories("an orange cat on a sofa") == frozenset({"cat", "couch"})
    assert mentioned_categories("an orange and white cat") == frozenset({"cat"})
    assert mentioned_categories("a man in an orange shirt") == frozenset({"person"})
    assert mentioned_categories("orange cones on a road") == frozenset()
    assert mentioned_categories("an orange next to a banana") == frozenset({"orange", "banana"})
    assert mentioned_categories("sliced oranges in a bowl") == frozenset({"orange", "bowl"})
    fruit_bowl = frozenset({"orange", "apple", "banana"})
    assert mentioned_categories("an orange, an apple and a banana") == fruit_bowl


def test_plural_flag_and_merged_phrases():
    by_text = {m.text: m for m in find_mentions("Two dogs, a sheep, three knives and a tabby cat")}
    assert by_text["dogs"].plural is True
    assert by_text["knives"].plural is True
    assert by_text["sheep"].plural is False  # invariant form: not unambiguously plural
    assert by_text["tabby cat"] == Mention("cat", 38, 47, "tabby cat", False)
    assert [m.text for m in find_mentions("a pickup truck")] == ["pickup truck"]


def test_spans_index_the_original_string():
    # "İ" lowercases to two characters; spans must still index the original.
    caption = "İİ  Dogs\tand PUPPIES near a Frisbee\nby the HOT - DOG cart"
    mentions = find_mentions(caption)
    assert [m.text for m in mentions] == ["Dogs", "PUPPIES", "Frisbee", "HOT - DOG"]
    assert mentions[0].start == caption.index("Dogs")
    for mention in mentions:
        assert caption[mention.start : mention.end] == mention.text
    starts = [m.start for m in mentions]
    assert starts == sorted(starts)
    assert all(a.end <= b.start for a, b in zip(mentions, mentions[1:]))


def test_every_surface_form_and_plural_maps_to_its_category():
    for category, words in SYNONYMS.items():
        for word in words:
            for form in {word, pluralize(word)}:
                caption = f"there is a {form} here."
                found = spans(caption)
                assert found == [(category, form, 11, 11 + len(form))], (category, form, found)


def test_non_string_caption_is_refused():
    with pytest.raises(TypeError, match="caption must be str"):
        find_mentions(None)  # type: ignore[arg-type]


# ----------------------------------------------------------------- mention_table


def test_mention_table_small_frame():
    captions = pl.DataFrame(
        {
            "caption_id": [7, 3, 9, 4],
            "caption": [
                "A dog catching a frisbee.",
                "Two dogs and a puppy on a couch",
                "An empty street",
                "A hot dog next to a dog",
            ],
            "image_id": [1, 1, 2, 2],
        }
    )
    table = mention_table(captions)
    assert table.schema == pl.Schema({"caption_id": pl.Int64, "category": pl.String})
    assert table.rows() == [
        (3, "couch"), (3, "dog"),
        (4, "dog"), (4, "hot dog"),
        (7, "dog"), (7, "frisbee"),
    ]


def test_mention_table_empty_and_bad_input():
    schema = {"caption_id": pl.Int32, "caption": pl.String}
    empty = mention_table(pl.DataFrame({"caption_id": [], "caption": []}, schema=schema))
    assert empty.height == 0
    assert empty.schema == pl.Schema({"caption_id": pl.Int64, "category": pl.String})
    with pytest.raises(ValueError, match="lacks column"):
        mention_table(pl.DataFrame({"id": [1], "caption": ["a dog"]}))
    with pytest.raises(ValueError, match=r"null caption for caption_id \[2\]"):
        mention_table(pl.DataFrame({"caption_id": [1, 2], "caption": ["a dog", None]}))
    with pytest.raises(ValueError, match="null caption_id"):
        mention_table(pl.DataFrame({"caption_id": [1, None], "caption": ["a dog", "a cat"]}))


# ----------------------------------------------------------------- register_categories


@pytest.fixture
def isolated_vocabulary(monkeypatch):
    """Let a test register categories without leaking them into other tests."""
    monkeypatch.setattr(vocabulary, "SYNONYMS", dict(vocabulary.SYNONYMS))
    monkeypatch.setattr(vocabulary, "_MATCHER", vocabulary._MATCHER)


def test_register_categories_adds_matchable_categories(isolated_vocabulary):
    register_categories({"traffic cone": ("cone", "pylon"), "dog": ("hound dog", "pooch")})
    assert vocabulary.SYNONYMS["traffic cone"] == ("traffic cone", "cone", "pylon")
    assert mentioned_categories("three Pylons and a traffic cone") == frozenset({"traffic cone"})
    assert mentioned_categories("two pooches") == frozenset({"dog"})
    assert mentioned_categories("a hound dog") == frozenset({"dog"})


def test_register_categories_conflict_changes_nothing(isolated_vocabulary):
    before = dict(vocabulary.SYNONYMS)
    with pytest.raises(ValueError, match="'puppy' maps to both"):
        register_categories({"toy": ("ball toy", "puppy")})
    assert vocabulary.SYNONYMS == before
    assert mentioned_categories("a ball toy") == frozenset({"sports ball"})
    with pytest.raises(ValueError, match="must be a tuple"):
        register_categories({"cone": "pylon"})  # type: ignore[dict-item]
