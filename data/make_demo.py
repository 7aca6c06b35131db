"""Write the offline demo data: a small corpus of shop reviews, a labelled review task, and preference pairs.

Everything here is generated from the word lists below (written for this project), with a fixed seed, so
the files are the same on every machine. Run `python data/make_demo.py` to rewrite data/demo/.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

OUT = Path(__file__).resolve().parent / "demo"

PRODUCTS = ["kettle", "lamp", "backpack", "teapot", "umbrella", "bicycle bell", "notebook", "blender", "desk chair",
            "rain jacket", "toaster", "headlamp", "water bottle", "garden hose", "alarm clock", "frying pan"]
SHOPS = ["Maple Street", "the corner shop", "Harbour Goods", "the night market", "Pinewood Stores", "Riverside"]
PRAISE = ["sturdy", "reliable", "beautiful", "quiet", "excellent", "well made", "comfortable", "bright", "clever"]
FAULT = ["flimsy", "noisy", "broken", "useless", "cheap looking", "wobbly", "leaky", "dim", "disappointing"]
GOOD_EVENTS = ["it still works perfectly after a month", "my whole family loves it", "it arrived a day early",
               "the instructions were clear", "it does exactly what it promises", "I would buy it again"]
BAD_EVENTS = ["it stopped working after a week", "the handle came off on the first day", "it arrived scratched",
              "the instructions made no sense", "it does not do what it promises", "I sent it back"]
GOOD_CLOSE = ["Highly recommended.", "Five stars.", "Great value for the price.", "A small joy every morning."]
BAD_CLOSE = ["Avoid it.", "One star.", "A waste of money.", "Not worth the trouble."]
NEUTRAL = ["I bought the {p} at {s} on a rainy Tuesday.", "The {p} comes in a brown paper box.",
           "There were three colours of {p} to choose from at {s}.", "The shop assistant at {s} wrapped the {p}.",
           "I use the {p} in the kitchen.", "My neighbour has the same {p}.",
           "A friend asked whether my review of the {p} would be positive or negative.",
           "Reviews of the {p} at {s} are sometimes positive and sometimes negative."]


def review(rng: random.Random, positive: bool) -> str:
    product, shop = rng.choice(PRODUCTS), rng.choice(SHOPS)
    words, events, close = (PRAISE, GOOD_EVENTS, GOOD_CLOSE) if positive else (FAULT, BAD_EVENTS, BAD_CLOSE)
    first, second = rng.sample(words, 2)
    parts = [rng.choice(NEUTRAL).format(p=product, s=shop),
             f"The {product} is {first} and {second}.",
             f"Honestly, {rng.choice(events)}.",
             rng.choice(close)]
    if rng.random() < 0.5:
        parts.insert(1, rng.choice(NEUTRAL).format(p=product, s=shop))
    return " ".join(parts)


def preference_pair(rng: random.Random) -> dict:
    """A review's neutral opening as the prompt; a positive ending about the same product chosen over a negative one."""
    product, shop = rng.choice(PRODUCTS), rng.choice(SHOPS)
    endings = []
    for words, events, close in ((PRAISE, GOOD_EVENTS, GOOD_CLOSE), (FAULT, BAD_EVENTS, BAD_CLOSE)):
        first, second = rng.sample(words, 2)
        endings.append(f"The {product} is {first} and {second}. Honestly, {rng.choice(events)}. {rng.choice(close)}")
    return {"prompt": rng.choice(NEUTRAL).format(p=product, s=shop), "chosen": endings[0], "rejected": endings[1]}


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    rng = random.Random(1234)
    corpus = [review(rng, rng.random() < 0.5) for _ in range(3000)]
    (OUT / "reviews.txt").write_text("\n".join(corpus) + "\n")
    for split, count in (("train", 1600), ("validation", 400)):
        rows = []
        for _ in range(count):
            positive = rng.random() < 0.5
            rows.append({"review": review(rng, positive), "label": "positive" if positive else "negative"})
        (OUT / f"sentiment_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    rng = random.Random(5678)
    for split, count in (("train", 800), ("validation", 100)):
        rows = [preference_pair(rng) for _ in range(count)]
        (OUT / f"preference_{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


if __name__ == "__main__":
    main()
