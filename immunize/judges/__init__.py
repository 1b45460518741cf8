"""Harmfulness judges behind one protocol, `score(prompts, responses) -> list[float]` (1 = harmful, NaN =
unreadable), and what is built on them.

- base: the protocol, the keyword matcher, Hugging Face sequence-classifier judges and the registry (make_judge).
- language_models: judges that are language models (StrongREJECT rubric and classifier formats, a Llama-Guard-style
  moderator, any template and parser).
- guards: the WildGuard and Qwen3Guard output formats, as language-model judges.
- presets: the judges the field reports (SEAM's DeBERTa classifier, beaver-dam, Llama Guard 3, the StrongREJECT
  classifier, WildGuard, Qwen3Guard), each a judge kind with its published format, registered by name.
- inputs: what every judge checks of its input, and how an answer reaches a judge as data.
- agreement: share flagged, pairwise agreement and Cohen's kappa over the same items.
- command: `immunize judges`, the command that scores generations with several judges (layer L5).

May import (all but command): immunize.errors, immunize.statistics and each other; the toy world's oracle is imported
lazily by name. command may import anything below the CLI.
"""
from immunize.judges.base import (DEFAULT_REFUSAL_PHRASES, ClassifierJudge, Judge, KeywordRefusalJudge,
                                   ModerationJudge, is_refusal, known_judges, make_judge, register_judge)

from immunize.judges import presets  # noqa: E402,F401  (registers the presets with make_judge)

__all__ = ["DEFAULT_REFUSAL_PHRASES", "ClassifierJudge", "Judge", "KeywordRefusalJudge", "ModerationJudge",
           "is_refusal", "known_judges", "make_judge", "register_judge"]
