"""Response parsing, caption/CoT segmentation and the rule-based verifiable reward (PRISM_SPEC §1, §6).

`rewards/` depends only on the record types, the standard library and math-verify, so it runs wherever a sample does.
- `response_format`: the validity rule and `ResponseSegmenter` (response ids -> `SegmentBounds` and text);
- `verifiable`: `verifiable_reward`, `reward_batch` and the judge registry keyed by `data_source`;
- `mm_gad_judge`, `math_verify_judge`: the two training accuracy judges; `geometry3k`: the geo3k validation reward
  (mathruler's grading without `eval`); `math_verify_runner`: time-limited, thread-safe math-verify.
"""

from prism_mcore.rewards.response_format import (
    RESPONSE_TAGS,
    VISION_TOKENS,
    FormatMatch,
    ResponseSegmenter,
    match_response_format,
    vision_token_ids,
)
from prism_mcore.rewards.verifiable import (
    DEFAULT_DATA_SOURCE,
    RewardResult,
    extract_answer,
    get_judge,
    register_judge,
    reward_batch,
    verifiable_reward,
)

__all__ = [
    "DEFAULT_DATA_SOURCE",
    "RESPONSE_TAGS",
    "VISION_TOKENS",
    "FormatMatch",
    "ResponseSegmenter",
    "RewardResult",
    "extract_answer",
    "get_judge",
    "match_response_format",
    "register_judge",
    "reward_batch",
    "verifiable_reward",
    "vision_token_ids",
]
