"""Name N things of a category within a word limit, asked in a chat (SmolLM2-135M-Instruct's suite).

    user:        "Answer in at most 4 words: name three fruits."
    assistant:   "apple, banana, cherry"

Fourteen everyday categories the model knows (fruits, colours, animals, days of the week, months, countries,
vegetables, planets, sports, drinks, body parts, shapes, instruments, furniture), one to three items, a limit of
one to three words more than the items, four phrasings of the limit.

``correct`` (the held-out accuracy) checks the format constraint exactly, case and punctuation aside: the words of
the response (runs of letters: numerals, list markers and punctuation are not words) number at most the limit;
every one is an item of the asked category (``CATEGORIES``; a plural such as "apples" counts as its item) or one of
the fillers "and", "or", "a", "an", "the"; and the items are exactly the asked number, none repeated.
"Apple, banana and cherry." is right for three fruits; "Here are three fruits: apple, banana, cherry" (words
besides items), "apple, banana" (two) and "red, blue, green" (another category) are wrong. An item missing from the
category's list counts as a wrong word: the lists are generous, yet a rare item is the rule's false negative.
``reward`` is ``correct`` (binary).

The demonstrator breaks the constraint in 40% of its rows: a lead-in sentence ("Here are three fruits: ...", over
every limit) or one item too many.
"""

from __future__ import annotations

import re

from rlhf_cli.tasks.base import Task

CATEGORIES: dict[str, tuple[str, tuple[str, ...]]] = {  # plural -> (singular, items: one lowercase word each)
    "fruits": ("fruit", ("apple", "banana", "orange", "grape", "mango", "pear", "peach", "cherry", "strawberry",
                         "lemon", "lime", "kiwi", "pineapple", "watermelon", "plum", "apricot", "grapefruit",
                         "blueberry", "raspberry", "melon", "papaya", "coconut", "fig", "pomegranate", "avocado",
                         "blackberry", "cranberry", "date", "nectarine", "tangerine", "guava", "lychee")),
    "colours": ("colour", ("red", "blue", "green", "yellow", "orange", "purple", "pink", "black", "white", "brown",
                           "grey", "gray", "violet", "indigo", "cyan", "magenta", "gold", "silver", "beige",
                           "turquoise", "maroon", "navy", "teal", "lavender", "crimson", "scarlet")),
    "animals": ("animal", ("cat", "dog", "lion", "tiger", "elephant", "horse", "cow", "pig", "sheep", "goat",
                           "rabbit", "mouse", "bear", "wolf", "fox", "deer", "monkey", "giraffe", "zebra", "kangaroo",
                           "dolphin", "whale", "shark", "eagle", "owl", "snake", "frog", "duck", "chicken", "penguin",
                           "cheetah", "panda", "koala", "camel", "hippo", "rhino", "squirrel", "bird", "fish",
                           "turtle", "hamster", "parrot", "bee", "ant", "leopard", "gorilla", "donkey", "crocodile")),
    "days of the week": ("day of the week", ("monday", "tuesday", "wednesday", "thursday", "friday", "saturday",
                                             "sunday")),
    "months": ("month", ("january", "february", "march", "april", "may", "june", "july", "august", "september",
                         "october", "november", "december")),
    "countries": ("country", ("france", "germany", "spain", "italy", "china", "japan", "india", "brazil", "canada",
                              "mexico", "russia", "egypt", "kenya", "nigeria", "australia", "argentina", "chile",
                              "peru", "sweden", "norway", "finland", "denmark", "poland", "greece", "turkey", "iran",
                              "israel", "portugal", "ireland", "england", "scotland", "wales", "austria",
                              "switzerland", "belgium", "netherlands", "ukraine", "thailand", "vietnam", "indonesia",
                              "pakistan", "nepal", "korea", "colombia", "cuba", "morocco", "ethiopia", "ghana",
                              "iceland", "hungary", "usa", "uk", "america", "britain")),
    "vegetables": ("vegetable", ("carrot", "potato", "tomato", "onion", "cabbage", "lettuce", "spinach", "broccoli",
                                 "cucumber", "pepper", "pea", "bean", "corn", "celery", "garlic", "cauliflower",
                                 "pumpkin", "zucchini", "eggplant", "radish", "beet", "kale", "leek", "asparagus",
                                 "mushroom", "turnip", "amaranth", "squash", "artichoke", "okra")),
    "planets": ("planet", ("mercury", "venus", "earth", "mars", "jupiter", "saturn", "uranus", "neptune")),
    "sports": ("sport", ("football", "soccer", "tennis", "basketball", "cricket", "rugby", "golf", "hockey",
                         "baseball", "swimming", "running", "cycling", "boxing", "volleyball", "badminton", "skiing",
                         "surfing", "judo", "karate", "rowing", "wrestling")),
    "drinks": ("drink", ("water", "tea", "coffee", "milk", "juice", "soda", "lemonade", "wine", "beer", "cocoa",
                         "smoothie", "cola")),
    "body parts": ("body part", ("hand", "foot", "head", "arm", "leg", "eye", "ear", "nose", "mouth", "knee",
                                 "elbow", "finger", "toe", "neck", "shoulder", "heart", "chin", "lip", "tongue",
                                 "tooth", "teeth", "back", "hip", "wrist", "ankle", "stomach", "brain", "skin",
                                 "hair", "feet")),
    "shapes": ("shape", ("circle", "square", "triangle", "rectangle", "oval", "star", "hexagon", "pentagon",
                         "diamond", "heart", "octagon", "cube", "sphere", "cone", "cylinder", "rhombus", "pyramid")),
    "instruments": ("instrument", ("piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp",
                                   "saxophone", "clarinet", "trombone", "banjo", "ukulele", "harmonica", "organ",
                                   "tuba", "oboe", "accordion", "bass", "xylophone")),
    "pieces of furniture": ("piece of furniture", ("chair", "table", "bed", "sofa", "couch", "desk", "shelf",
                                                   "bookshelf", "wardrobe", "dresser", "stool", "bench", "cabinet",
                                                   "cupboard", "armchair", "drawer")),
}
FILLERS = frozenset({"and", "or", "a", "an", "the"})
COUNT_WORDS = {1: "one", 2: "two", 3: "three"}
PHRASINGS = ("Answer in at most {N} words: name {what}.", "In {N} words or fewer, name {what}.",
             "Name {what}, using at most {N} words.", "Using no more than {N} words, name {what}.")
_ANSWER = re.compile(r"(\d+) (.+), at most (\d+) words")


def _what(n: int, category: str) -> str:
    return f"one {CATEGORIES[category][0]}" if n == 1 else f"{COUNT_WORDS[n]} {category}"


def problem(rng):
    category = rng.choice(sorted(CATEGORIES))
    n = rng.choice((1, 2, 3))
    limit = n + rng.choice((1, 2, 3))
    prompt = rng.choice(PHRASINGS).format(N=limit, what=_what(n, category))
    items = rng.sample(CATEGORIES[category][1], n + 1)  # one spare for the "one too many" slip
    return {"prompt": prompt, "answer": f"{n} {category}, at most {limit} words", "items": items,
            "category": category, "n": n, "limit": limit}


def gold(prob):
    return ", ".join(prob["items"][:prob["n"]])


def _lead_in(prob):
    what = _what(prob["n"], prob["category"])
    return f"Here {'is' if prob['n'] == 1 else 'are'} {what}: {gold(prob)}."


def demo(prob, rng):
    r = rng.random()
    if r < 0.25:
        return _lead_in(prob)  # words besides the items: over every limit (the lead-in alone is 4+ words)
    if r < 0.4:
        return ", ".join(prob["items"])  # one item too many
    return gold(prob)


def wrong(prob, rng):
    n, items = prob["n"], prob["items"]
    kind = rng.randrange(4)
    if kind == 0:
        return _lead_in(prob)
    if kind == 1:
        return ", ".join(items)  # n + 1 items
    if kind == 2:  # an item of another category
        other = rng.choice([c for c in sorted(CATEGORIES) if c != prob["category"]])
        odd = rng.choice([w for w in CATEGORIES[other][1] if not _item(w, prob["category"])])
        return ", ".join(items[:n - 1] + [odd])
    if n > 1:
        return ", ".join(items[:n - 1] + [items[0]])  # an item repeated
    kind = CATEGORIES[prob["category"]][0]
    return f"{items[0]} is {'an' if kind[0] in 'aeiou' else 'a'} {kind}"  # words besides the item


def _item(word: str, category: str) -> str | None:
    """The category's item this word names (plurals folded: apples, cherries, tomatoes), else None."""
    vocab = CATEGORIES[category][1]
    for cand in (word, word[:-1] if word.endswith("s") else None, word[:-2] if word.endswith("es") else None,
                 word[:-3] + "y" if word.endswith("ies") else None):
        if cand and cand in vocab:
            return cand
    return None


def correct(prompt, response, answer=None, **row) -> float:
    spec = _ANSWER.fullmatch(str(answer))
    if not spec:
        return 0.0
    n, category, limit = int(spec.group(1)), spec.group(2), int(spec.group(3))
    words = re.findall(r"[a-z]+", response.lower())  # numerals, list markers ("1.", "-") and punctuation are not words
    if not words or len(words) > limit:
        return 0.0
    named = []
    for w in words:
        if w in FILLERS:
            continue
        item = _item(w, category)
        if item is None:
            return 0.0
        named.append(item)
    return float(len(named) == n and len(set(named)) == n)


reward = correct


TASK = Task(__name__, "name N of a category within a word limit; chat; ~3 words; binary; slip: a lead-in or one item "
            "too many in 40% of rows", problem, demo, gold, wrong, chat=True,
            n_sft=1000, n_pairs=2000, n_prompts=500, n_eval=100)
