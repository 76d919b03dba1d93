"""The object vocabulary: which caption words name which object category.

This is the one module that maps caption text to object categories
(docs/definitions.md#object-mentions). Everything that asks "does this caption mention a dog?" --
caption-based co-occurrence, caption edits, the hallucination rate -- asks here.

The synonym list follows CHAIR (Rohrbach et al. 2018, "Object Hallucination in
Image Captioning", the ``synonyms.txt`` of LisaAnne/Hallucination) and its
hard-coded special cases; the list and the matcher are this project's own code,
written to that idea, and they differ from CHAIR where noted below.

Matching
    Case-insensitive, on whole words (``\\b`` with Unicode word characters, so
    "dogma" is not dog and "cathedral" is not cat). Hyphens and runs of spaces
    between the words of a phrase are equivalent ("hot-dog" == "hot  dog" ==
    "hot dog"). Apostrophes end a word ("dog's" is dog). Every surface form is
    matched singular and plural (plurals from :func:`pluralize`). Phrases win over
    their parts, longest first, as in CHAIR: "hot dog" is food, "teddy bear" is
    not a bear, "baseball bat" one mention, "stop sign" and "fire hydrant" whole.

CHAIR's special cases, kept
    * "baby"/"adult" before an animal is not a person: "baby elephant" is one
      elephant mention; "baby animal", "baby cub" mention nothing. (CHAIR lists the
      ten animal category names; here every surface form of those categories.)
    * "passenger" before a vehicle is not a person: "passenger jet" is an airplane,
      "passenger train" a train. (CHAIR: jet and train; here every vehicle form.)
    * "toilet seat" is the toilet; and when a caption mentions a toilet, "seat"
      there is not a chair ("the seat of the toilet is up").
    * "train track(s)" mentions nothing (no train); "bow tie" is a tie.
    * "ball" is a sports ball, "table"/"desk" a dining table, "seat"/"stool" a
      chair, "monitor" a tv, "computer"/"notebook" a laptop, "goat" a sheep,
      "container" a bowl, "bagel" a donut, "bow" a tie -- CHAIR's choices.
    * "glass" alone is NOT a wine glass: CHAIR lists only "wine glass" (its
      "wine glas" entry is a lemmatiser artefact), and in COCO captions "glass" is
      mostly a material ("glass door") and "glasses" mostly spectacles.

Deviations from CHAIR (this project's choices)
    * "bat" alone is a baseball bat (CHAIR lists only "baseball bat"; COCO has no
      animal bat and its captions use "bat" for the baseball bat).
    * "hotdog" is a hot dog, so "a hotdog stand" mentions hot dog (never dog):
      CHAIR's tokeniser keeps "hotdog" whole and misses it.
    * Spelling and spacing variants: "aeroplane", "airliner", "back pack",
      "hand bag", "snow board", "skate board", "surf board", "racquet",
      "tennis racquet", "baseball mitt", "hair dryer", "tooth brush", "grizzly".
    * More person words that COCO captions use often: surfer, batter, catcher,
      umpire, pedestrian, toddler, cyclist, motorcyclist, tourist, spectator,
      athlete, businessman, fireman, teen, youngster.
    * CHAIR lemmatiser artefacts dropped ("knive", "phon"); plurals such as
      "people", "children", "oxen", "knives" come from :func:`pluralize` instead.
    * Colour "orange": "orange" is not the fruit when it directly qualifies
      another mentioned object ("an orange cat"), a colour ("orange and white"),
      "colored", or a few nouns COCO captions often colour ("orange shirt",
      "orange cones"). CHAIR counts them all as the fruit.
    * Adjacent mentions of the same category merge into one ("a tabby cat",
      "pickup truck", "baby girl"), so a caption edit removes the whole phrase.

``Mention.plural`` is True only for an unambiguously plural surface form
("dogs", "men", "knives"); invariant forms ("sheep", "cattle", "scissors") are
reported as not plural.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # polars is imported lazily: matching captions does not need it
    import polars as pl

__all__ = [
    "COCO_CATEGORIES",
    "COCO_CATEGORY_IDS",
    "COCO_SUPERCATEGORIES",
    "SYNONYMS",
    "Mention",
    "find_mentions",
    "mention_table",
    "mentioned_categories",
    "pluralize",
    "register_categories",
]

# (official id, name, supercategory) of the 80 COCO-2017 instance categories.
_COCO_TABLE: tuple[tuple[int, str, str], ...] = (
    (1, "person", "person"),
    (2, "bicycle", "vehicle"),
    (3, "car", "vehicle"),
    (4, "motorcycle", "vehicle"),
    (5, "airplane", "vehicle"),
    (6, "bus", "vehicle"),
    (7, "train", "vehicle"),
    (8, "truck", "vehicle"),
    (9, "boat", "vehicle"),
    (10, "traffic light", "outdoor"),
    (11, "fire hydrant", "outdoor"),
    (13, "stop sign", "outdoor"),
    (14, "parking meter", "outdoor"),
    (15, "bench", "outdoor"),
    (16, "bird", "animal"),
    (17, "cat", "animal"),
    (18, "dog", "animal"),
    (19, "horse", "animal"),
    (20, "sheep", "animal"),
    (21, "cow", "animal"),
    (22, "elephant", "animal"),
    (23, "bear", "animal"),
    (24, "zebra", "animal"),
    (25, "giraffe", "animal"),
    (27, "backpack", "accessory"),
    (28, "umbrella", "accessory"),
    (31, "handbag", "accessory"),
    (32, "tie", "accessory"),
    (33, "suitcase", "accessory"),
    (34, "frisbee", "sports"),
    (35, "skis", "sports"),
    (36, "snowboard", "sports"),
    (37, "sports ball", "sports"),
    (38, "kite", "sports"),
    (39, "baseball bat", "sports"),
    (40, "baseball glove", "sports"),
    (41, "skateboard", "sports"),
    (42, "surfboard", "sports"),
    (43, "tennis racket", "sports"),
    (44, "bottle", "kitchen"),
    (46, "wine glass", "kitchen"),
    (47, "cup", "kitchen"),
    (48, "fork", "kitchen"),
    (49, "knife", "kitchen"),
    (50, "spoon", "kitchen"),
    (51, "bowl", "kitchen"),
    (52, "banana", "food"),
    (53, "apple", "food"),
    (54, "sandwich", "food"),
    (55, "orange", "food"),
    (56, "broccoli", "food"),
    (57, "carrot", "food"),
    (58, "hot dog", "food"),
    (59, "pizza", "food"),
    (60, "donut", "food"),
    (61, "cake", "food"),
    (62, "chair", "furniture"),
    (63, "couch", "furniture"),
    (64, "potted plant", "furniture"),
    (65, "bed", "furniture"),
    (67, "dining table", "furniture"),
    (70, "toilet", "furniture"),
    (72, "tv", "electronic"),
    (73, "laptop", "electronic"),
    (74, "mouse", "electronic"),
    (75, "remote", "electronic"),
    (76, "keyboard", "electronic"),
    (77, "cell phone", "electronic"),
    (78, "microwave", "appliance"),
    (79, "oven", "appliance"),
    (80, "toaster", "appliance"),
    (81, "sink", "appliance"),
    (82, "refrigerator", "appliance"),
    (84, "book", "indoor"),
    (85, "clock", "indoor"),
    (86, "vase", "indoor"),
    (87, "scissors", "indoor"),
    (88, "teddy bear", "indoor"),
    (89, "hair drier", "indoor"),
    (90, "toothbrush", "indoor"),
)

COCO_CATEGORIES: tuple[str, ...] = tuple(name for _, name, _ in _COCO_TABLE)
COCO_CATEGORY_IDS: dict[str, int] = {name: cid for cid, name, _ in _COCO_TABLE}
COCO_SUPERCATEGORIES: dict[str, str] = {name: sup for _, name, sup in _COCO_TABLE}

# Category -> singular surface forms; the first is the canonical caption word (the
# category name itself, singular: "skis" -> "ski"). CHAIR's synonyms.txt, cleaned of
# duplicates, plurals and lemmatiser artefacts; "# +" marks this project's additions.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "person": (
        "person", "girl", "boy", "man", "woman", "kid", "child", "chef", "baker",
        "adult", "rider", "baby", "worker", "passenger", "sister", "biker",
        "policeman", "cop", "officer", "lady", "cowboy", "bride", "groom", "male",
        "female", "guy", "traveler", "mother", "father", "gentleman", "pitcher",
        "player", "skier", "snowboarder", "skater", "skateboarder", "foreigner",
        "caller", "offender", "coworker", "trespasser", "patient", "politician",
        "soldier", "grandchild", "serviceman", "walker", "drinker", "doctor",
        "bicyclist", "thief", "buyer", "teenager", "student", "camper", "driver",
        "solider", "hunter", "shopper", "villager",
        # +
        "surfer", "batter", "catcher", "umpire", "pedestrian", "toddler", "cyclist",
        "motorcyclist", "tourist", "spectator", "athlete", "businessman", "fireman",
        "teen", "youngster",
    ),
    "bicycle": ("bicycle", "bike", "unicycle", "minibike", "trike"),
    "car": (
        "car", "automobile", "van", "minivan", "sedan", "suv", "hatchback", "cab",
        "jeep", "coupe", "taxicab", "limo", "taxi",
    ),
    "motorcycle": ("motorcycle", "scooter", "motor bike", "motor cycle", "motorbike", "moped"),
    "airplane": (
        "airplane", "jetliner", "plane", "air plane", "monoplane", "aircraft", "jet",
        "airbus", "biplane", "seaplane",
        "aeroplane", "airliner",  # +
    ),
    "bus": ("bus", "minibus", "trolley"),
    "train": ("train", "locomotive", "tramway", "caboose"),
    "truck": ("truck", "pickup", "lorry", "hauler", "firetruck"),
    "boat": (
        "boat", "ship", "liner", "sailboat", "motorboat", "dinghy", "powerboat",
        "speedboat", "canoe", "skiff", "yacht", "kayak", "catamaran", "pontoon",
        "houseboat", "vessel", "rowboat", "trawler", "ferryboat", "watercraft",
        "tugboat", "schooner", "barge", "ferry", "sailboard", "paddleboat",
        "lifeboat", "freighter", "steamboat", "riverboat", "battleship", "steamship",
    ),
    "traffic light": (
        "traffic light", "street light", "traffic signal", "stop light", "streetlight",
        "stoplight",
    ),
    "fire hydrant": ("fire hydrant", "hydrant"),
    "stop sign": ("stop sign",),
    "parking meter": ("parking meter",),
    "bench": ("bench", "pew"),
    "bird": (
        "bird", "ostrich", "owl", "seagull", "goose", "duck", "parakeet", "falcon",
        "robin", "pelican", "waterfowl", "heron", "hummingbird", "mallard", "finch",
        "pigeon", "sparrow", "seabird", "osprey", "blackbird", "fowl", "shorebird",
        "woodpecker", "egret", "chickadee", "quail", "bluebird", "kingfisher",
        "buzzard", "willet", "gull", "swan", "bluejay", "flamingo", "cormorant",
        "parrot", "loon", "gosling", "waterbird", "pheasant", "rooster", "sandpiper",
        "crow", "raven", "turkey", "oriole", "cowbird", "warbler", "magpie",
        "peacock", "cockatiel", "lorikeet", "puffin", "vulture", "condor", "macaw",
        "peafowl", "cockatoo", "songbird",
    ),
    "cat": ("cat", "kitten", "feline", "tabby"),
    "dog": (
        "dog", "puppy", "beagle", "pup", "chihuahua", "schnauzer", "dachshund",
        "rottweiler", "canine", "pitbull", "collie", "pug", "terrier", "poodle",
        "labrador", "doggie", "doberman", "mutt", "doggy", "spaniel", "bulldog",
        "sheepdog", "weimaraner", "corgi", "cocker", "greyhound", "retriever",
        "brindle", "hound", "whippet", "husky",
    ),
    "horse": (
        "horse", "colt", "pony", "racehorse", "stallion", "equine", "mare", "foal",
        "palomino", "mustang", "clydesdale", "bronc", "bronco",
    ),
    "sheep": ("sheep", "lamb", "ram", "goat", "ewe"),
    "cow": (
        "cow", "cattle", "ox", "calf", "holstein", "heifer", "buffalo", "bull", "zebu",
        "bison",
    ),
    "elephant": ("elephant",),
    "bear": ("bear", "panda", "grizzly"),  # "grizzly": +
    "zebra": ("zebra",),
    "giraffe": ("giraffe",),
    "backpack": ("backpack", "knapsack", "back pack"),  # "back pack": +
    "umbrella": ("umbrella",),
    "handbag": ("handbag", "wallet", "purse", "briefcase", "hand bag"),  # "hand bag": +
    "tie": ("tie", "bow", "bow tie"),
    "suitcase": ("suitcase", "suit case", "luggage"),
    "frisbee": ("frisbee",),
    "skis": ("ski",),
    "snowboard": ("snowboard", "snow board"),  # "snow board": +
    "sports ball": ("sports ball", "ball"),
    "kite": ("kite",),
    "baseball bat": ("baseball bat", "bat"),  # "bat": +
    "baseball glove": ("baseball glove", "baseball mitt"),  # "baseball mitt": +
    "skateboard": ("skateboard", "skate board"),  # "skate board": +
    "surfboard": (
        "surfboard", "longboard", "skimboard", "shortboard", "wakeboard",
        "surf board",  # +
    ),
    "tennis racket": ("tennis racket", "racket", "racquet", "tennis racquet"),  # racquet: +
    "bottle": ("bottle",),
    "wine glass": ("wine glass",),
    "cup": ("cup",),
    "fork": ("fork",),
    "knife": ("knife", "pocketknife"),
    "spoon": ("spoon",),
    "bowl": ("bowl", "container"),
    "banana": ("banana",),
    "apple": ("apple",),
    "sandwich": ("sandwich", "burger", "sub", "cheeseburger", "hamburger"),
    "orange": ("orange",),
    "broccoli": ("broccoli",),
    "carrot": ("carrot",),
    "hot dog": ("hot dog", "hotdog"),  # "hotdog": +
    "pizza": ("pizza",),
    "donut": ("donut", "doughnut", "bagel"),
    "cake": ("cake", "cheesecake", "cupcake", "shortcake", "coffeecake", "pancake"),
    "chair": ("chair", "seat", "stool"),
    "couch": ("couch", "sofa", "recliner", "futon", "loveseat", "settee", "chesterfield"),
    "potted plant": ("potted plant", "houseplant"),
    "bed": ("bed",),
    "dining table": ("dining table", "table", "desk"),
    "toilet": ("toilet", "urinal", "commode", "lavatory", "potty"),
    "tv": ("tv", "monitor", "televison", "television"),
    "laptop": (
        "laptop", "computer", "notebook", "netbook", "lenovo", "macbook",
        "laptop computer",
    ),
    "mouse": ("mouse",),
    "remote": ("remote",),
    "keyboard": ("keyboard",),
    "cell phone": (
        "cell phone", "mobile phone", "phone", "cellphone", "telephone", "smartphone",
        "iphone",
    ),
    "microwave": ("microwave",),
    "oven": ("oven", "stovetop", "stove", "stove top oven"),
    "toaster": ("toaster",),
    "sink": ("sink",),
    "refrigerator": ("refrigerator", "fridge", "freezer"),
    "book": ("book",),
    "clock": ("clock",),
    "vase": ("vase",),
    "scissors": ("scissors",),
    "teddy bear": ("teddy bear", "teddybear"),
    "hair drier": ("hair drier", "hairdryer", "hair dryer"),  # "hair dryer": +
    "toothbrush": ("toothbrush", "tooth brush"),  # "tooth brush": +
}

# --------------------------------------------------------------------------- plurals

_INVARIANT_PLURALS = frozenset({
    "sheep", "fish", "deer", "moose", "bison", "cattle", "swine", "offspring",
    "series", "species", "aircraft", "watercraft", "spacecraft", "hovercraft",
    # already plural (pluralia tantum, or a plural passed in)
    "scissors", "skis", "glasses", "pants", "shorts", "jeans", "trousers", "pajamas",
    "people", "children", "men", "women", "oxen", "mice", "geese", "teeth", "feet",
    "police",
})
_IRREGULAR_PLURALS = {
    "person": "people", "child": "children", "man": "men", "woman": "women",
    "mouse": "mice", "goose": "geese", "tooth": "teeth", "foot": "feet", "ox": "oxen",
    "louse": "lice", "die": "dice", "life": "lives",
}
# Compounds inherit their head's irregular plural ("policeman" -> "policemen").
_IRREGULAR_SUFFIXES = (
    ("woman", "women"), ("man", "men"), ("child", "children"), ("person", "people"),
    ("mouse", "mice"), ("tooth", "teeth"), ("goose", "geese"), ("foot", "feet"),
)
_SUFFIX_EXCEPTIONS = frozenset({
    "human", "german", "roman", "shaman", "talisman", "caiman", "ottoman", "doberman",
    "mongoose", "mussulman",
})
_F_TO_VES = (
    "knife", "wife", "calf", "half", "leaf", "loaf", "shelf", "thief", "wolf", "elf",
    "sheaf", "scarf", "hoof",
)
_O_TO_OES = frozenset({
    "potato", "tomato", "hero", "echo", "buffalo", "mango", "volcano", "torpedo",
    "veto", "mosquito", "tornado", "domino",
})
_CH_AS_K = frozenset({"stomach", "monarch", "epoch", "matriarch", "patriarch", "loch"})
_VOWELS = frozenset("aeiou")


def _plural_of_head(head: str) -> str:
    """Plural of one lowercase word."""
    if head in _INVARIANT_PLURALS or head.endswith("craft"):
        return head
    if head in _IRREGULAR_PLURALS:
        return _IRREGULAR_PLURALS[head]
    if head not in _SUFFIX_EXCEPTIONS:
        for suffix, plural_suffix in _IRREGULAR_SUFFIXES:
            if head.endswith(suffix):
                return head[: -len(suffix)] + plural_suffix
    for singular in _F_TO_VES:
        if head.endswith(singular):
            stem = head[:-2] if head.endswith("fe") else head[:-1]
            return stem + "ves"
    if len(head) > 1 and head.endswith("y") and head[-2] not in _VOWELS:
        return head[:-1] + "ies"
    if head.endswith(("s", "x", "z", "sh")) or (head.endswith("ch") and head not in _CH_AS_K):
        return head + "es"
    if head in _O_TO_OES:
        return head + "es"
    return head + "s"


def pluralize(word: str) -> str:
    """English plural of a noun or noun phrase; the head (last word) is inflected.

    "dog" -> "dogs", "bus" -> "buses", "knife" -> "knives", "man" -> "men",
    "person" -> "people", "sheep" -> "sheep", "hot dog" -> "hot dogs". Words joined
    by a space or hyphen keep their separator ("hot-dog" -> "hot-dogs"). An all-caps
    or capitalised head keeps its casing. An empty or blank input raises ValueError.
    """
    match = re.search(r"([^\s\-]+)(\s*)$", word)
    if match is None:
        raise ValueError(f"pluralize: got {word!r}; pass a non-empty noun such as 'dog'")
    head, trailing = match.group(1), match.group(2)
    plural = _plural_of_head(head.lower())
    if len(head) > 1 and head.isupper():
        plural = plural.upper()
    elif head[0].isupper():
        plural = plural[0].upper() + plural[1:]
    return word[: match.start(1)] + plural + trailing


def _plural_variants(form: str) -> set[str]:
    """Every plural spelling the matcher accepts for a normalised form."""
    plurals = {pluralize(form)}
    head = form.rsplit(" ", 1)[-1]
    stem = form[: len(form) - len(head)]
    if head.endswith("o") and head not in _INVARIANT_PLURALS:
        plurals |= {stem + head + "s", stem + head + "es"}  # "buffalos", "buffaloes"
    if head == "person" or head.endswith("person"):
        plurals.add(stem + head + "s")  # "persons"
    if head == "bus":
        plurals.add(stem + "busses")
    return plurals


# --------------------------------------------------------------------------- matcher

# Between the words of a phrase: spaces, hyphen-minus, Unicode hyphens.
_SEPARATOR_CLASS = r"[\s\-\u2010\u2011]+"
_SEPARATOR_RUN = re.compile(_SEPARATOR_CLASS)
_ONLY_SEPARATORS = re.compile(_SEPARATOR_CLASS + r"\Z")

# CHAIR's context rules, expressed as phrases (see the module docstring).
_ANIMAL_CATEGORIES = ("bird", "cat", "dog", "horse", "sheep", "cow", "elephant", "bear", "zebra", "giraffe")
_BLOCKING_PHRASES = ("train track", "baby animal", "adult animal", "baby cub", "adult cub")
_TOILET_SEAT_FORMS = frozenset({"seat", "seats"})

_COLOURS = (
    "white", "black", "red", "blue", "green", "yellow", "brown", "pink", "purple",
    "gray", "grey", "silver", "gold", "tan", "beige", "teal", "orange",
)
_COMMONLY_COLOURED_NOUNS = (
    "shirt", "t-shirt", "jacket", "coat", "vest", "hat", "cap", "helmet", "jersey",
    "uniform", "dress", "pants", "shorts", "shoe", "sweater", "hoodie", "cone", "sign",
    "wall", "building", "light", "sky", "flower", "paint", "color", "colour",
    "background", "roof", "door", "tile", "box", "bag", "bucket", "stripe", "stripes",
    "cloth", "tablecloth", "curtain", "fence", "sunset", "glow",
)
# What may follow "orange" when it names a colour rather than the fruit.
_ORANGE_AS_COLOUR_NEXT = re.compile(
    r"(?:" + _SEPARATOR_CLASS + r"|\s*[,/&]\s*|\s+(?:and|or)\s+)"
    r"(?:(?:" + "|".join(_COLOURS) + r")\b|colou?red\b|tinted\b|striped\b|ish\b)"
    r"|" + _SEPARATOR_CLASS
    + r"(?:" + "|".join(re.escape(noun) for noun in _COMMONLY_COLOURED_NOUNS) + r")(?:e?s)?\b"
)


@dataclass(frozen=True)
class Mention:
    """One mention of an object category in a caption.

    ``start``/``end`` index the ORIGINAL caption string (``caption[start:end] ==
    text``); ``plural`` is True for an unambiguously plural surface form.
    """

    category: str
    start: int
    end: int
    text: str
    plural: bool


@dataclass(frozen=True)
class _Matcher:
    pattern: re.Pattern[str]
    # normalised surface form -> (category, plural); category None = consume, no mention
    forms: dict[str, tuple[str | None, bool]]


def _normalise(text: str) -> str:
    return _SEPARATOR_RUN.sub(" ", text.strip().lower())


def _trie_regex(forms: list[str]) -> str:
    """One regex alternation over all forms, factored as a character trie.

    Factoring keeps the compiled regex fast (one branch per distinct next character)
    and, with greedy optional tails, prefers the longest form at a given start.
    """
    trie: dict = {}
    for form in forms:
        node = trie
        for char in form:
            node = node.setdefault(char, {})
        node[""] = {}

    def emit(node: dict) -> str:
        branches = []
        for char in sorted(c for c in node if c):
            edge = _SEPARATOR_CLASS if char == " " else re.escape(char)
            branches.append(edge + emit(node[char]))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        return "(?:" + body + ")?" if "" in node else body

    return emit(trie)


def _build_matcher(synonyms: dict[str, tuple[str, ...]]) -> _Matcher:
    forms: dict[str, tuple[str | None, bool]] = {}

    def add(form: str, category: str | None, plural: bool) -> None:
        known = forms.get(form)
        if known is not None and known[0] != category:
            raise ValueError(
                f"vocabulary: surface form {form!r} maps to both {known[0]!r} and "
                f"{category!r}; remove it from one category's synonyms"
            )
        if known is None or (known[1] and not plural):  # singular reading wins
            forms[form] = (category, plural)

    def add_with_plurals(form: str, category: str | None) -> None:
        add(form, category, False)
        for plural in _plural_variants(form):
            add(plural, category, plural != form)

    for category, words in synonyms.items():
        for word in words:
            add_with_plurals(_normalise(word), category)
    # Context phrases go in after the synonyms; they only ever add longer forms.
    for animal in _ANIMAL_CATEGORIES:
        for word in synonyms.get(animal, ()):
            for qualifier in ("baby", "adult"):
                add_with_plurals(f"{qualifier} {_normalise(word)}", animal)
    for vehicle in (c for c, sup in COCO_SUPERCATEGORIES.items() if sup == "vehicle"):
        for word in synonyms.get(vehicle, ()):
            add_with_plurals(f"passenger {_normalise(word)}", vehicle)
    add_with_plurals("toilet seat", "toilet")
    for phrase in _BLOCKING_PHRASES:
        add_with_plurals(phrase, None)

    alternation = _trie_regex(sorted(forms))
    return _Matcher(pattern=re.compile(r"\b(?:" + alternation + r")\b"), forms=forms)


_MATCHER: _Matcher = _build_matcher(SYNONYMS)


def _lowercase_same_length(caption: str) -> str:
    # str.lower() may lengthen a character ("İ" -> "i̇"), which would shift spans;
    # in that rare case lowercase only the characters that stay one character.
    lowered = caption.lower()
    if len(lowered) == len(caption):
        return lowered
    return "".join(c.lower() if len(c.lower()) == 1 else c for c in caption)


def _scan(caption: str) -> list[tuple[str, int, int, bool]]:
    """(category, start, end, plural) of every mention, after CHAIR's context rules."""
    if not isinstance(caption, str):
        raise TypeError(f"vocabulary: a caption must be str, got {type(caption).__name__}: {caption!r}")
    matcher = _MATCHER
    lowered = _lowercase_same_length(caption)
    found: list[tuple[str, int, int, bool, str]] = []
    for match in matcher.pattern.finditer(lowered):
        form = _normalise(match.group())
        category, plural = matcher.forms[form]
        if category is not None:
            found.append((category, match.start(), match.end(), plural, form))
    if not found:
        return []

    if any(category == "toilet" for category, *_ in found):
        found = [m for m in found if not (m[0] == "chair" and m[4] in _TOILET_SEAT_FORMS)]

    kept: list[tuple[str, int, int, bool, str]] = []
    for index, mention in enumerate(found):
        if mention[4] == "orange" and _names_a_colour(lowered, mention[2], found[index + 1 :]):
            continue
        kept.append(mention)

    merged: list[tuple[str, int, int, bool]] = []
    for category, start, end, plural, _ in kept:
        if merged and merged[-1][0] == category and _ONLY_SEPARATORS.match(lowered, merged[-1][2], start):
            # "tabby cat", "pickup truck": one phrase; the head (last word) sets the number.
            merged[-1] = (category, merged[-1][1], end, plural)
        else:
            merged.append((category, start, end, plural))
    return merged


def _names_a_colour(lowered: str, end: int, later: list[tuple[str, int, int, bool, str]]) -> bool:
    """Whether the "orange" ending at ``end`` qualifies what follows (a colour, not fruit)."""
    if later and _ONLY_SEPARATORS.match(lowered, end, later[0][1]):
        return True  # "an orange cat", "orange frisbee"
    return _ORANGE_AS_COLOUR_NEXT.match(lowered, end) is not None


def find_mentions(caption: str) -> list[Mention]:
    """Every object-category mention in a caption, sorted by start, non-overlapping.

    Spans index the original string: ``caption[m.start:m.end] == m.text``. Matching
    rules are those of the module docstring (case-insensitive whole words, phrases
    longest first, CHAIR's context rules). A non-str caption raises TypeError.
    """
    return [
        Mention(category, start, end, caption[start:end], plural)
        for category, start, end, plural in _scan(caption)
    ]


def mentioned_categories(caption: str) -> frozenset[str]:
    """The set of categories a caption mentions (see :func:`find_mentions`)."""
    return frozenset(category for category, *_ in _scan(caption))


def mention_table(captions: pl.DataFrame) -> pl.DataFrame:
    """One row per (caption, mentioned category), unique, sorted by caption_id then category.

    Input: columns ``caption_id`` (integer) and ``caption`` (string); other columns
    are ignored. Output: ``caption_id`` Int64, ``category`` String. A missing column
    or a null caption raises ValueError naming the column or the caption_id.
    """
    import polars as pl

    missing = [c for c in ("caption_id", "caption") if c not in captions.columns]
    if missing:
        raise ValueError(
            f"mention_table: input frame lacks column(s) {missing}; it has {captions.columns}. "
            "Pass a frame with caption_id (int) and caption (str)."
        )
    if not captions.schema["caption_id"].is_integer():
        raise ValueError(
            f"mention_table: column 'caption_id' must be an integer type, got "
            f"{captions.schema['caption_id']}; cast it before calling."
        )
    if captions["caption_id"].null_count():
        raise ValueError(
            f"mention_table: {captions['caption_id'].null_count()} row(s) have a null caption_id; "
            "every caption needs its id -- drop or fill them before computing mentions."
        )
    null_ids = captions.filter(pl.col("caption").is_null())["caption_id"].head(5).to_list()
    if null_ids:
        raise ValueError(
            f"mention_table: null caption for caption_id {null_ids} (first five shown); "
            "drop or fill these captions before computing mentions."
        )

    caption_ids: list[int] = []
    categories: list[str] = []
    for caption_id, caption in zip(
        captions["caption_id"].to_list(), captions["caption"].cast(pl.String).to_list(), strict=True
    ):
        for category in {m[0] for m in _scan(caption)}:
            caption_ids.append(caption_id)
            categories.append(category)
    return (
        pl.DataFrame(
            {"caption_id": caption_ids, "category": categories},
            schema={"caption_id": pl.Int64, "category": pl.String},
        )
        .unique()
        .sort("caption_id", "category")
    )


def register_categories(extra: dict[str, tuple[str, ...]]) -> None:
    """Add categories (or more synonyms of existing ones) to the vocabulary, in place.

    ``extra`` maps a category name to its singular surface forms (phrases allowed);
    the category name itself is always matched too. Forms are matched
    case-insensitively with their plurals, like the built-in ones. A form already
    owned by another category, or an empty name or form, raises ValueError and
    leaves the vocabulary unchanged. Later calls to the matching functions see the
    additions; ``SYNONYMS`` is updated in place.
    """
    global _MATCHER
    updated = dict(SYNONYMS)
    for category, words in extra.items():
        if not isinstance(category, str) or not category.strip():
            raise ValueError(f"register_categories: category name {category!r} is empty; give it a name")
        if isinstance(words, str):
            raise ValueError(
                f"register_categories: synonyms of {category!r} must be a tuple of strings, "
                f"got the string {words!r}; write ({words!r},)"
            )
        cleaned = []
        for word in (category, *words):
            if not isinstance(word, str) or not _normalise(word):
                raise ValueError(
                    f"register_categories: category {category!r} has an empty or non-string "
                    f"synonym {word!r}; remove it"
                )
            cleaned.append(_normalise(word))
        existing = updated.get(category, ())
        seen = {_normalise(w) for w in existing}
        additions = tuple(w for w in dict.fromkeys(cleaned) if w not in seen)
        updated[category] = existing + additions
    matcher = _build_matcher(updated)  # raises on conflicts before anything changes
    SYNONYMS.clear()
    SYNONYMS.update(updated)
    _MATCHER = matcher
