"""The largest sampling parameters the engine accepts, where the HTTP schemas read them too.

Kept apart from the samplers (torch) so the HTTP layer can bound its fields without loading
them.
"""

MAX_PENALTY = 2.0  # presence and frequency, as OpenAI
MAX_REPETITION_PENALTY = 10.0
MAX_LOGPROBS = 20  # most likely tokens reported per position, as OpenAI
