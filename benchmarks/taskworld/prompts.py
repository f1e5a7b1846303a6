"""Plain-text prompts shared by every base: zero-shot and in-context (shots) alike.

The tiny base reads these strings as they are; a chat base wraps them with its chat template (`Base.render`).
The answer follows the final "answer:" (a causal LM continues it; a seq2seq LM outputs it).
"""

from collections.abc import Sequence


def format_prompt(instruction: str, input_text: str, shots: Sequence[tuple[str, str]] = ()) -> str:
    """The instruction, then each (input, answer) shot, then the query input awaiting its answer."""
    blocks = [f"input: {shot_input}\nanswer: {shot_answer}" for shot_input, shot_answer in shots]
    blocks.append(f"input: {input_text}\nanswer:")
    return instruction.strip() + "\n" + "\n\n".join(blocks)
