"""The prompts benchmarks/speculative.py runs: input-grounded ones (the answer copies from the prompt: repeat,
edit, summarise, quote, change code) and open-ended ones (nothing to copy), in the default model's chat format."""

from __future__ import annotations

PRINTING = (
    "The history of the printing press begins in the fifteenth century, when Johannes Gutenberg of Mainz "
    "combined a screw press, oil-based ink and movable type cast from a lead alloy. Before him, books in "
    "Europe were copied by hand, mostly in monasteries, and a single Bible could take a scribe more than a "
    "year. Within fifty years of the first printed Bible, presses were working in more than two hundred "
    "cities, and millions of volumes had been printed."
)
TYPOS = (
    "Our team met on monday to discus the new budjet. Everyone agred that the oficial launch should be "
    "moved to the secound week of March, becuase the suppliers need more time. Maria will send the "
    "updated shedule to all departments by friday, and Tom will contact the printing company."
)
CODE = '''def total(xs):
    s = 0
    for x in xs:
        if x > 0:
            s = s + x
    return s


def average(xs):
    if len(xs) == 0:
        return 0
    return total(xs) / len(xs)
'''
BEES = (
    "Honey bees live in colonies of up to sixty thousand workers, one queen and a few hundred drones. "
    "The workers are female; they build the wax comb, feed the larvae, guard the entrance and, in the last "
    "weeks of their lives, fly out to collect nectar and pollen. A forager tells her sisters where flowers "
    "are with a waggle dance: the angle of the dance shows the direction relative to the sun, and its "
    "length shows the distance. Nectar is stored in the comb and fanned by the workers until most of its "
    "water has evaporated, which turns it into honey."
)
RECIPE = (
    "Pancakes. Ingredients: 200 g flour, 2 eggs, 300 ml milk, 1 tablespoon sugar, a pinch of salt, "
    "butter for the pan. Method: whisk the flour, sugar and salt in a bowl. Add the eggs and half of the "
    "milk and whisk until smooth, then add the rest of the milk. Rest the batter for 20 minutes. Heat a "
    "little butter in a pan and pour in a ladle of batter; cook for one minute on each side."
)

GROUNDED = {
    "repeat": "Repeat this text exactly, word for word:\n\n" + PRINTING,
    "fix typos": "Correct the spelling mistakes in this text and give back the corrected text only:\n\n" + TYPOS,
    "edit code": "Rename the function `total` to `positive_sum` in this Python code and show the whole code:\n\n"
    + CODE,
    "summarise": "Summarise this text in three sentences:\n\n" + BEES,
    "quote": "Copy the method of this recipe as a numbered list of steps:\n\n" + RECIPE,
}
OPEN = {
    "story": "Write a short story about a lighthouse keeper.",
    "explain": "Explain how an airplane stays in the air.",
    "poem": "Write a poem about autumn.",
    "ideas": "Give me ten ideas for a child's birthday party.",
    "email": "Write an email to a colleague asking to move our meeting to Thursday.",
}


def chat(text: str) -> str:
    """One user turn in SmolLM2's chat format, ready for the assistant's answer."""
    return f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n"
