"""``chat-lengths``: chat rows whose lengths spread as real instruction data's do.

Instruction sets such as Alpaca or ShareGPT hold rows from ~20 to ~1,000+ tokens; a batch of
them padded to its longest row is mostly padding, which is what ``data.packing`` removes
(docs/packing.md). This task gives such rows offline, with an answer that can be checked:
the user shows a passage of common English words and asks for its last K words; the
assistant answers with them.

Lengths: a row's target length in tokens is drawn from a log-normal distribution with median
150 and 95th percentile 700 (μ = ln 150, σ = ln(700/150) / 1.645 = 0.936), cut to [24, 1500];
a fifth to a half of its words are the answer. Words are counted at 1.04 tokens each and the
chat template and question at 44 tokens (SmolLM2's tokenizer and template), so that measured
lengths follow the target (``benchmarks/packing.py`` prints the measured spread).
Deterministic per split.
"""

from __future__ import annotations

import math
import random

WORDS = (
    "time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work "
    "government number night point home water room mother area money story fact month lot "
    "right study book eye job word business issue side kind head house service friend father "
    "power hour game line end member law car city community name president team minute idea "
    "kid body information back parent face others level office door health person art war "
    "history party result change morning reason research girl guy moment air teacher force "
    "education foot boy age policy music market sense nation plan college interest death "
    "experience effect class control care field development role effort rate heart drug show "
    "leader light voice wife police mind price report decision son view relationship town "
    "road arm difference value building action model season society tax director position "
    "player record paper space ground form event official matter center couple site project "
    "activity star table need court oil situation cost industry figure street image phone data"
).split()
ASK = "Repeat the last {k} words of this passage, separated by spaces."
MEDIAN, P95 = 150, 700
SIGMA = math.log(P95 / MEDIAN) / 1.645
TOKENS_PER_WORD = 1.04
OVERHEAD = 44  # tokens of the chat template and the question
MIN_LEN, MAX_LEN = 24, 1500


class ChatLengths:
    name = "chat-lengths"
    metric = "exact_match"
    sizes = {"train": 2000, "valid": 50, "test": 100}
    seeds = {"train": 21, "valid": 22, "test": 23}

    def rows(self, split: str, max_len: int | None = None) -> list[dict]:
        rng = random.Random(self.seeds[split])
        out = []
        for _ in range(self.sizes[split]):
            tokens = min(MAX_LEN, max(MIN_LEN, rng.lognormvariate(math.log(MEDIAN), SIGMA)))
            words = max(4, round((tokens - OVERHEAD) / TOKENS_PER_WORD))
            k = max(1, round(words * rng.uniform(0.2, 0.5)))
            passage = [rng.choice(WORDS) for _ in range(words - k)]
            answer = passage[-k:] if k <= len(passage) else passage
            out.append(
                {
                    "messages": [
                        {
                            "role": "user",
                            "content": " ".join(passage) + "\n\n" + ASK.format(k=len(answer)),
                        },
                        {"role": "assistant", "content": " ".join(answer)},
                    ]
                }
            )
        return out
