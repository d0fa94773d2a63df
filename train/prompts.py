"""Prompt sources for self-generated training data: the model continues them greedily, and the
look-ahead learns to predict those continuations (what greedy PaSS must draft).

- "stdlib": HumanEval-shaped code prompts (a function's signature and docstring) from this Python's
  standard library; good for code models and for instruct models asked to complete code.
- "chat": user requests built from task templates x subjects, for instruct models (with --chat).
  They are built so that none equals a benchmark prompt in infer/prompts (tested): evaluation
  prompts stay held back.
- a JSONL file with a "prompt" field, or a text file of prompts separated by blank lines.
"""

from __future__ import annotations

import ast
import itertools
import json
from pathlib import Path

import numpy as np

from .common import corpus_files

CODE_TASKS = [
    "sorts a list of dictionaries by a given key", "counts the consonants in a string", "merges two sorted lists",
    "computes the factorial of a number", "checks whether a string is a palindrome", "flattens a nested list",
    "finds the most common element in a list", "converts Celsius to Fahrenheit",
    "removes duplicates from a list while keeping the order", "computes the n-th triangular number",
    "splits a list into chunks of size n", "returns the second largest number in a list",
    "counts the words in a text file", "validates an email address", "computes the mean and median of a list",
    "transposes a matrix", "finds all anagrams of a word in a list", "converts a Roman numeral to an integer",
    "checks whether brackets in a string are balanced", "computes the dot product of two vectors",
    "returns the prime factors of a number", "capitalizes every word in a sentence", "implements binary search",
    "parses a CSV line into fields", "generates the first n prime numbers", "rotates a list by k positions",
    "computes the Levenshtein distance of two strings", "groups words by their first letter",
    "reads a JSON file and returns its keys", "implements bubble sort",
    "computes the running sum of a list", "checks whether two strings are rotations of each other",
    "converts a binary string to an integer", "finds the longest word in a sentence",
    "returns the intersection of two lists", "computes the power set of a set", "implements a queue with two stacks",
    "counts the frequency of each character in a string", "checks whether a year is a leap year",
    "finds the missing number in a list from 1 to n", "computes the area of a circle given its radius",
    "zips two lists into a dictionary", "removes all whitespace from a string", "implements insertion sort",
    "returns the n-th row of Pascal's triangle", "checks whether a list is sorted",
    "computes the sum of the digits of a number", "finds the maximum subarray sum",
    "converts a string to title case without using title()", "computes the cumulative product of a list",
    "returns every permutation of a string", "checks whether a number is a perfect square",
    "computes the least common multiple of two numbers", "finds the first non-repeating character in a string",
    "converts an integer to its binary representation", "checks whether two strings are anagrams",
    "returns the Fibonacci numbers below n", "counts how often each word appears in a text",
    "merges two dictionaries, adding the values of shared keys", "implements quicksort",
    "finds the longest common prefix of a list of strings", "converts a snake_case string to camelCase",
    "returns the median of two sorted lists", "checks whether a number is an Armstrong number",
    "computes the GCD of a list of numbers", "finds pairs in a list that sum to a target",
    "implements a stack with push, pop and peek", "removes the vowels from a string",
    "computes the average word length of a sentence", "returns the k largest elements of a list",
]
CODE_TEMPLATES = ["Write a Python function that {}.", "Implement a function in Python that {}.",
                  "Can you write Python code that {}? Explain it briefly.", "Show me a short Python function that {}.",
                  "Write a Python function with a docstring that {}.",
                  "Using only the standard library, write Python code that {}."]
TOPICS = [
    "photosynthesis", "the water cycle", "black holes", "inflation", "machine learning", "the French Revolution",
    "vaccines", "climate change", "the stock market", "the internet", "gravity", "DNA", "volcanoes",
    "the Roman Empire", "electric cars", "sleep", "compound interest", "the immune system", "earthquakes",
    "the printing press", "neural networks", "the moon landing", "recycling", "coffee", "honeybees",
    "the Renaissance", "solar power", "democracy", "the human heart", "plate tectonics",
    "rainbows", "the Great Wall of China", "antibiotics", "wind energy", "the Olympic Games", "bitcoin",
    "the ocean tides", "dinosaurs", "the steam engine", "the periodic table", "coral reefs", "the telephone",
    "the seasons", "quantum computing", "the Amazon rainforest", "supply and demand", "the brain", "glaciers",
    "the Silk Road", "electricity", "migration of birds", "the speed of light",
    "the Industrial Revolution", "tornadoes", "the human eye", "chess", "the Pyramids of Giza", "batteries",
    "nuclear energy", "the Milky Way", "the Cold War", "rain forests", "vitamins", "the blockchain",
    "the theory of evolution", "airplanes", "the ozone layer", "opera", "the Moon's phases", "ants",
    "the Byzantine Empire", "magnets", "deserts", "jazz", "cloud computing", "the carbon cycle",
]
TOPIC_TEMPLATES = ["Explain {} in simple terms.", "Write a short paragraph about {}.", "What are three facts about {}?",
                   "Why is {} important?", "Give a beginner's introduction to {}.", "Write a short poem about {}.",
                   "Describe {} to a ten-year-old.", "What are common misconceptions about {}?"]
SOURCES = ("stdlib", "chat")


def chat_prompts() -> list[str]:
    return ([t.format(task) for t, task in itertools.product(CODE_TEMPLATES, CODE_TASKS)]
            + [t.format(topic) for t, topic in itertools.product(TOPIC_TEMPLATES, TOPICS)])


def stdlib_prompts(limit: int = 4000) -> list[str]:
    """Signature + docstring of documented top-level functions of the standard library."""
    out: list[str] = []
    for f in corpus_files(None):
        try:
            src = f.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, OSError, ValueError):
            continue
        lines = src.splitlines(keepends=True)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and ast.get_docstring(node) and not node.name.startswith("_"):
                doc = node.body[0]
                text = "".join(lines[node.lineno - 1:doc.end_lineno])
                if len(text) < 1500:
                    out.append(text)
        if len(out) >= limit:
            break
    return out


def read_prompts(source: str, n: int, seed: int) -> list[str]:
    """n prompts from a source (see the module doc), shuffled by seed; fewer when the source holds fewer."""
    if source == "stdlib":
        prompts = stdlib_prompts()
    elif source == "chat":
        prompts = chat_prompts()
    else:
        path = Path(source)
        if not path.is_file():
            raise FileNotFoundError(f"--self-prompts {source!r}: not {' or '.join(SOURCES)} and not a file")
        text = path.read_text()
        if path.suffix == ".jsonl":
            prompts = [json.loads(line)["prompt"] for line in text.splitlines() if line.strip()]
        else:
            prompts = [p for p in text.split("\n\n") if p.strip()]
    if not prompts:
        raise ValueError(f"--self-prompts {source!r} holds no prompts")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[:n]]
