"""A held-out judge for the demo's reviews (recipes/demo-grpo.yaml names it under `eval.rewards`; training never
sees it): the share of praise among the praise and fault words a review uses. Plain word lists, so a review that
pleases the trained classifier without saying anything good about the product scores no higher for it."""

import re

PRAISE = ("sturdy", "reliable", "beautiful", "quiet", "excellent", "well made", "comfortable", "bright", "clever",
          "works perfectly", "loves it", "a day early", "were clear", "exactly what it promises", "buy it again",
          "recommended", "five stars", "great value", "small joy")
FAULT = ("flimsy", "noisy", "broken", "useless", "cheap looking", "wobbly", "leaky", "dim", "disappointing",
         "stopped working", "came off", "scratched", "made no sense", "does not do what", "sent it back",
         "avoid it", "one star", "waste of money", "not worth")


def count(text: str, phrases: tuple[str, ...]) -> int:
    return sum(len(re.findall(rf"\b{re.escape(phrase)}\b", text)) for phrase in phrases)


def praise_share(text: str) -> float:
    """Praise words / (praise + fault words) in the review; 0.5 (undecided) when it has neither."""
    text = text.lower()
    praise, fault = count(text, PRAISE), count(text, FAULT)
    return praise / (praise + fault) if praise + fault else 0.5
