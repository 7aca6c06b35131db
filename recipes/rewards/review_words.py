"""Held-out judges for reviews (named under `eval.rewards`; training never sees them): the share of praise among the
praise and fault words a review uses. Plain word lists, so a review that pleases a trained classifier without saying
anything good scores no higher for it. `praise_share` judges the demo's product reviews (recipes/demo-grpo.yaml),
`movie_praise_share` movie reviews (recipes/gpt2-grpo-imdb.yaml)."""

import re

PRAISE = ("sturdy", "reliable", "beautiful", "quiet", "excellent", "well made", "comfortable", "bright", "clever",
          "works perfectly", "loves it", "a day early", "were clear", "exactly what it promises", "buy it again",
          "recommended", "five stars", "great value", "small joy")
FAULT = ("flimsy", "noisy", "broken", "useless", "cheap looking", "wobbly", "leaky", "dim", "disappointing",
         "stopped working", "came off", "scratched", "made no sense", "does not do what", "sent it back",
         "avoid it", "one star", "waste of money", "not worth")
MOVIE_PRAISE = ("great", "excellent", "wonderful", "brilliant", "beautiful", "amazing", "superb", "loved", "enjoyed",
                "masterpiece", "moving", "funny", "best", "fantastic", "perfect", "recommend", "favorite", "gem")
MOVIE_FAULT = ("bad", "worst", "awful", "terrible", "boring", "waste", "poor", "stupid", "horrible", "dull",
               "disappointing", "mess", "pointless", "lame", "annoying", "unfunny", "avoid", "ridiculous")


def count(text: str, phrases: tuple[str, ...]) -> int:
    return sum(len(re.findall(rf"\b{re.escape(phrase)}\b", text)) for phrase in phrases)


def share(text: str, praise_words: tuple[str, ...], fault_words: tuple[str, ...]) -> float:
    """Praise words / (praise + fault words) in the text; 0.5 (undecided) when it has neither."""
    text = text.lower()
    praise, fault = count(text, praise_words), count(text, fault_words)
    return praise / (praise + fault) if praise + fault else 0.5


def praise_share(text: str) -> float:
    return share(text, PRAISE, FAULT)


def movie_praise_share(text: str) -> float:
    return share(text, MOVIE_PRAISE, MOVIE_FAULT)
