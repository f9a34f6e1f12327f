"""The PRISM prompt and response format (PRISM_SPEC §1): the canonical system prompt, the user turn and the
caption/think/answer response layout.

Everything that writes or renders PRISM prompts and responses (dataset builders, chat rendering, evaluation) takes
them from here, so the policy, the discriminator and the rewards all see the same strings; the response tags
themselves are defined with the validity rule that reads them, in `rewards.response_format`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from prism_mcore.rewards.response_format import (
    ANSWER_CLOSE,
    ANSWER_OPEN,
    CAPTION_CLOSE,
    CAPTION_OPEN,
    THINK_CLOSE,
    THINK_OPEN,
)

# The reference's Python copies of the prompt end with a newline after `</answer>` (its jinja default does not);
# we follow the Python copies, which are what the training data was built with.
SYSTEM_PROMPT = (
    "You are a helpful scientific assistant.\n"
    "Answer the user's question based on the image provided.\n"
    "\n"
    "Your output must strictly follow this XML format:\n"
    "\n"
    "<caption>\n"
    "- [Briefly describe the image style, key objects, and text using bullet points]\n"
    "</caption>\n"
    "<think>\n"
    "[Reason step-by-step to solve the problem]\n"
    "</think>\n"
    "<answer>\n"
    "[Final answer ONLY]\n"
    "</answer>\n"
)

IMAGE_PLACEHOLDER = "<image>"  # LLaMA-Factory / verl placeholder for one image in a text turn


def user_prompt(question: str) -> str:
    """The user turn of a one-image question: `<image>` on its own line, then the question (PRISM_SPEC §1)."""
    return f"{IMAGE_PLACEHOLDER}\n{question}\n"


def prompt_messages(question: str) -> list[dict[str, str]]:
    """The chat prompt of the alignment/RL data: the system prompt, then the user turn with `<image>`."""
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user_prompt(question)}]


@dataclass(frozen=True)
class Response:
    """A response in PRISM format: caption bullet points, reasoning lines and the final answer."""

    caption_lines: Sequence[str]
    reasoning_lines: Sequence[str]
    answer: str

    @property
    def caption(self) -> str:
        """The caption segment with its tags; the reference's `teacher_caption` field."""
        bullets = "\n".join(f"- {line}" for line in self.caption_lines)
        return f"{CAPTION_OPEN}\n{bullets}\n{CAPTION_CLOSE}"

    @property
    def cot(self) -> str:
        """The reasoning and answer with their tags; the reference's `teacher_cot` field."""
        reasoning = "\n".join(self.reasoning_lines)
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n{ANSWER_OPEN}\n{self.answer}\n{ANSWER_CLOSE}"

    @property
    def text(self) -> str:
        """The whole response, as a model should generate it (before its EOS token)."""
        return f"{self.caption}\n{self.cot}"
