"""``passkey``: find a five-digit pass key hidden in long filler text (long-context retrieval).

The test of the LongLoRA paper (Chen et al. 2023, "LongLoRA: Efficient Fine-tuning of
Long-Context Large Language Models", Sec. 4.2), taken from Mohtashami & Jaggi 2023
("Landmark Attention"): a fixed instruction, the same filler sentences repeated, one sentence
giving a random pass key at a random depth, more filler, and the question at the end. The
answer is the key, scored by exact match. Solving it means attending from the end of the
sequence to a token thousands of positions back, which is what shifted sparse attention
(S2-Attn) has to preserve while it trains on local groups only.

Lengths follow ``data.max_seq_len``: each row is between half and 85% of it in tokens
(2048 to 3482 tokens at ``max_seq_len: 4096``), estimated at 24 tokens per filler block for
the usual BPE tokenizers, so that the chat template and the answer still fit. Generated
deterministically per split (the splits use different seeds and so different keys).
"""

from __future__ import annotations

import random

INTRO = (
    "There is an important piece of information hidden inside a lot of irrelevant text. "
    "Find it and memorize it. I will quiz you about it."
)
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
KEY_LINE = "The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = "What is the pass key? Answer with the number only."
#: tokens of one FILLER block (SmolLM2's and Llama's tokenizers: 22-25)
FILLER_TOKENS = 24
DEFAULT_MAX_LEN = 4096


class Passkey:
    name = "passkey"
    metric = "exact_match"
    sizes = {"train": 1000, "valid": 20, "test": 50}
    seeds = {"train": 11, "valid": 12, "test": 13}

    def rows(self, split: str, max_len: int | None = None) -> list[dict]:
        max_len = max_len or DEFAULT_MAX_LEN
        lo, hi = max(1, max_len // 2 // FILLER_TOKENS), max(1, int(0.85 * max_len) // FILLER_TOKENS)
        rng = random.Random(self.seeds[split])
        out = []
        for _ in range(self.sizes[split]):
            n = rng.randint(lo, max(lo, hi - 2))  # the key line and the question: ~2 blocks
            depth = rng.randint(0, n)
            key = str(rng.randint(10000, 99999))
            text = " ".join(
                [
                    INTRO,
                    *[FILLER] * depth,
                    KEY_LINE.format(key=key),
                    *[FILLER] * (n - depth),
                    QUESTION,
                ]
            )
            out.append(
                {
                    "messages": [
                        {"role": "user", "content": text},
                        {"role": "assistant", "content": key},
                    ]
                }
            )
        return out
