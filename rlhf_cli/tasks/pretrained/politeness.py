"""A style only a reward model scores: answer first, then one short follow-up offer (SmolLM2-135M-Instruct's suite).

    user:        "What is the capital of France?"
    chosen:      "The capital of France is Paris. Would you like to know more about France?"
    rejected:    "Paris."                                              (curt)
                 "Great question! There is a lot to say about this. ..." (rambling: the answer buried, 40+ words)

The prompts are short factual questions with nothing about style in them: the style lives in the preference pairs
alone. **RL for this task runs with the reward model alone** (``reward=rm``): there is no rule reward, and
``reward`` is ``None`` on purpose, so naming it in ``reward.functions`` fails at once with one error line
(``is NoneType None, not callable``). scripts/suite_pretrained.py reads ``RM_ONLY`` in
``rlhf_cli.tasks.pretrained`` and runs this task's RL cells with ``reward=rm`` only.

``correct`` is the hidden rule, for held-out measurement only (``eval.rule``): never a reward. A response is right
when it is exactly two sentences, at most 30 words, where the first holds the answer (any of the ``answer`` field's
``|``-separated forms, case aside) and is not a question, and the second is a question of at most 12 words that
starts with an offer: "Would you like", "Do you want", "Want me to", "Shall I", "Should I", "Can I" or "May I".

The demonstrator writes the chosen style in half its rows; in 30% it stops after the answer (no offer) and in 20% it
rambles, so SFT learns the style only in part and the reward model is what can finish it.
"""

from __future__ import annotations

import re

from rlhf_cli.tasks.base import Task

CAPITALS = (("France", "Paris"), ("Germany", "Berlin"), ("Italy", "Rome"), ("Spain", "Madrid"), ("Japan", "Tokyo"),
            ("China", "Beijing"), ("Russia", "Moscow"), ("Egypt", "Cairo"), ("England", "London"),
            ("Canada", "Ottawa"), ("Greece", "Athens"), ("Portugal", "Lisbon"), ("Ireland", "Dublin"),
            ("Austria", "Vienna"), ("Norway", "Oslo"), ("Sweden", "Stockholm"), ("Denmark", "Copenhagen"),
            ("Finland", "Helsinki"), ("Poland", "Warsaw"), ("Hungary", "Budapest"), ("Kenya", "Nairobi"),
            ("Argentina", "Buenos Aires"), ("Peru", "Lima"), ("Thailand", "Bangkok"), ("South Korea", "Seoul"),
            ("India", "New Delhi"), ("Mexico", "Mexico City"), ("Belgium", "Brussels"), ("Cuba", "Havana"),
            ("Scotland", "Edinburgh"), ("Australia", "Canberra"), ("Turkey", "Ankara"), ("Iceland", "Reykjavik"),
            ("the Netherlands", "Amsterdam"), ("Ukraine", "Kyiv|Kiev"), ("Chile", "Santiago"),
            ("Colombia", "Bogota|Bogotá"), ("Vietnam", "Hanoi"), ("Indonesia", "Jakarta"), ("Wales", "Cardiff"))
CAPITAL_QUESTIONS = ("What is the capital of {x}?", "Which city is the capital of {x}?",
                     "What city is the capital of {x}?")
# (question, answer forms, the answer sentence, the topic of the offer)
FACTS = (
    ("What colour is grass?", "green", "Grass is green.", "grass"),
    ("What colour is the sky on a clear day?", "blue", "The sky is blue on a clear day.", "the sky"),
    ("What colour is a ripe banana?", "yellow", "A ripe banana is yellow.", "bananas"),
    ("What colour is snow?", "white", "Snow is white.", "snow"),
    ("What colour are ripe strawberries?", "red", "Ripe strawberries are red.", "strawberries"),
    ("How many legs does a spider have?", "eight|8", "A spider has eight legs.", "spiders"),
    ("How many legs does a dog have?", "four|4", "A dog has four legs.", "dogs"),
    ("How many legs does a bird have?", "two|2", "A bird has two legs.", "birds"),
    ("How many days are in a week?", "seven|7", "There are seven days in a week.", "the week"),
    ("How many months are in a year?", "twelve|12", "There are twelve months in a year.", "the calendar"),
    ("How many hours are in a day?", "24|twenty-four", "There are 24 hours in a day.", "time"),
    ("How many wheels does a bicycle have?", "two|2", "A bicycle has two wheels.", "bicycles"),
    ("How many sides does a triangle have?", "three|3", "A triangle has three sides.", "triangles"),
    ("How many continents are there?", "seven|7", "There are seven continents.", "the continents"),
    ("What do bees make?", "honey", "Bees make honey.", "bees"),
    ("What is frozen water called?", "ice", "Frozen water is called ice.", "ice"),
    ("What is the largest planet in our solar system?", "Jupiter", "The largest planet is Jupiter.", "Jupiter"),
    ("Which planet is closest to the Sun?", "Mercury", "Mercury is the closest planet to the Sun.", "Mercury"),
    ("Which planet is known as the Red Planet?", "Mars", "Mars is known as the Red Planet.", "Mars"),
    ("What is the largest ocean on Earth?", "Pacific", "The largest ocean is the Pacific Ocean.", "the Pacific"),
    ("What is the tallest animal?", "giraffe", "The tallest animal is the giraffe.", "giraffes"),
    ("What is the largest animal?", "blue whale", "The largest animal is the blue whale.", "blue whales"),
    ("Which animal says meow?", "cat", "A cat says meow.", "cats"),
    ("Which animal is known as the king of the jungle?", "lion", "The lion is known as the king of the jungle.",
     "lions"),
    ("What do cows drink?", "water", "Cows drink water.", "cows"),
    ("What gas do plants take in?", "carbon dioxide|CO2", "Plants take in carbon dioxide.", "plants"),
    ("What is the boiling point of water in Celsius?", "100", "Water boils at 100 degrees Celsius.", "water"),
    ("What is the freezing point of water in Celsius?", "0|zero", "Water freezes at 0 degrees Celsius.", "water"),
    ("What season comes after winter?", "spring", "Spring comes after winter.", "the seasons"),
    ("What is the opposite of hot?", "cold", "The opposite of hot is cold.", "opposites"),
    ("What is the chemical symbol for water?", "H2O", "The chemical symbol for water is H2O.", "water"),
    ("What language is spoken in Brazil?", "Portuguese", "The main language in Brazil is Portuguese.", "Brazil"),
    ("What language is spoken in Mexico?", "Spanish", "The main language in Mexico is Spanish.", "Mexico"),
    ("Who wrote Romeo and Juliet?", "Shakespeare", "William Shakespeare wrote Romeo and Juliet.", "Shakespeare"),
    ("What is the main ingredient of bread?", "flour", "The main ingredient of bread is flour.", "bread"),
    ("What do caterpillars turn into?", "butterflies|butterfly|moth", "Caterpillars turn into butterflies.",
     "butterflies"),
    ("What is the hardest natural substance?", "diamond", "The hardest natural substance is diamond.", "diamonds"),
    ("What is the fastest land animal?", "cheetah", "The fastest land animal is the cheetah.", "cheetahs"),
    ("Where do penguins mostly live?", "Antarctica|southern", "Most penguins live in Antarctica and the far south.",
     "penguins"),
    ("What is the largest desert in Africa?", "Sahara", "The largest desert in Africa is the Sahara.", "the Sahara"),
)
LEADS = ("", "Quick question: ", "Can you tell me: ")  # three wordings of each question
OFFERS = ("Would you like to know more about {t}?", "Would you like more details?", "Want me to tell you more?",
          "Shall I share a fun fact about {t}?", "Do you want to know more about {t}?")
_OFFER_START = re.compile(r"(would you like|do you want|want me to|shall i|should i|can i|may i)\b", re.I)
_RAMBLE = ("Great question! There is actually quite a lot to say about this, so let me think it through. {s} "
           "It is one of those things many people wonder about, and it has a long and interesting story behind it. "
           "I hope this helps with whatever you are working on today.")


def problem(rng):
    if rng.random() < 0.6:
        country, city = rng.choice(CAPITALS)
        sentence = f"The capital of {country} is {city.split('|')[0]}."
        q, answer, topic = rng.choice(CAPITAL_QUESTIONS).format(x=country), city, country
    else:
        q, answer, sentence, topic = rng.choice(FACTS)
    offer = rng.choice(OFFERS).format(t=topic)
    lead = rng.choice(LEADS)
    q = lead + q[0].lower() + q[1:] if lead else q
    return {"prompt": q, "answer": answer, "sentence": sentence, "offer": offer}


def gold(prob):
    return f"{prob['sentence']} {prob['offer']}"


def _curt(prob):
    return prob["answer"].split("|")[0] + "."


def demo(prob, rng):
    r = rng.random()
    if r < 0.3:
        return prob["sentence"]  # stops after the answer: no offer
    if r < 0.5:
        return _RAMBLE.format(s=prob["sentence"])
    return gold(prob)


def wrong(prob, rng):
    return _curt(prob) if rng.random() < 0.5 else _RAMBLE.format(s=prob["sentence"])


def correct(prompt, response, answer=None, **row) -> float:
    """The hidden rule (held-out measurement only): the answer first, then one short follow-up offer."""
    text = response.strip()
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", text) if s]
    if len(sentences) != 2 or len(text.split()) > 30:
        return 0.0
    first, offer = sentences
    forms = [f.lower() for f in str(answer).split("|") if f]
    if first.endswith("?") or not any(f in first.lower() for f in forms):
        return 0.0
    return float(offer.endswith("?") and len(offer.split()) <= 12 and _OFFER_START.match(offer) is not None)


reward = None  # no rule reward: RL on this task runs with the reward model alone (see the module docstring)


TASK = Task(__name__, "answer first + one follow-up offer; chat; ~15 words; RM only (hidden rule for eval); "
            "slip: no offer in 30%, rambling in 20% of rows", problem, demo, gold, wrong, chat=True,
            n_sft=1000, n_pairs=2000, n_prompts=500, n_eval=100)
