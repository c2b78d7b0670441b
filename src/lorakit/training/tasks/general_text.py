"""``general-text``: held-out general English prose, for measuring forgetting.

The loss of a model on these paragraphs before and after fine-tuning on a task that does not
cover them shows how much general language modelling the fine-tuning destroyed (the seed
document's "catastrophic forgetting" comparison). Plain-text rows (``{"text": ...}``).
"""

from __future__ import annotations

PARAGRAPHS = [
    (
        "The river wound slowly through the valley, past fields of barley and small stone farms. "
        "In the evening the fishermen pulled their boats onto the gravel and talked about the "
        "weather, which had been unusually warm for the season."
    ),
    (
        "A library is more than a collection of books. It is a quiet place where people of every "
        "age come to read, to study, and sometimes simply to sit and think about what they have "
        "learned during the day."
    ),
    (
        "Bread is made from flour, water, salt and yeast. The dough is kneaded until it becomes "
        "smooth and elastic, then left to rise in a warm place before it is shaped and baked in a "
        "hot oven."
    ),
    (
        "The museum opened a new exhibition about the history of navigation. Visitors could see "
        "old maps, brass compasses and a small model of a sailing ship that had crossed the ocean "
        "three hundred years ago."
    ),
    (
        "Regular exercise improves both physical and mental health. Even a short walk every day "
        "can lower stress, help people sleep better and make it easier to concentrate at work or "
        "at school."
    ),
    (
        "When the train finally arrived, the platform was crowded with travellers carrying heavy "
        "suitcases. A conductor in a dark blue uniform checked the tickets and helped an elderly "
        "woman find her seat."
    ),
    (
        "Bees play an important role in agriculture because they pollinate many of the plants "
        "that people eat. Farmers sometimes keep hives near their orchards so that the trees "
        "produce more fruit."
    ),
    (
        "The old clock in the town square had stopped many years ago, but nobody wanted to repair "
        "it. People said that it reminded them of a time when life moved more slowly."
    ),
    (
        "Learning a new language takes patience. At first the grammar seems strange and the words "
        "are hard to remember, but after a few months of practice simple conversations become "
        "possible."
    ),
    (
        "The garden behind the house was full of roses, tomatoes and tall sunflowers. Every "
        "morning the children watered the plants and searched for ripe strawberries under the "
        "leaves."
    ),
    (
        "Mountains affect the weather of the regions around them. Moist air rises along their "
        "slopes, cools, and falls as rain or snow, while the land on the other side often stays "
        "dry."
    ),
    (
        "The small bakery on the corner was famous for its cinnamon rolls. On Saturday mornings a "
        "long line of customers waited patiently outside, even when it was raining."
    ),
]


class GeneralText:
    name = "general-text"
    metric = None

    def rows(self, split: str, max_len: int | None = None) -> list[dict]:
        return [{"text": p} for p in PARAGRAPHS]
