"""A tiny MMLU-format sample of our own questions (not MMLU's): `--mmlu embedded/mmlu-sample`.

It exists so that `fedtune eval` runs end to end offline on a clean clone (the demo, the tests). Its
numbers say nothing about the leaderboard: for that, evaluate the real MMLU test set (57 subjects).
Written on demand in the MMLU tarball layout (`data/test/<subject>_test.csv`) under the fedtune cache.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

from fedtune.atomic import write_text
from fedtune.embedded import cache_dir

EMBEDDED_MMLU = "embedded/mmlu-sample"

# subject -> rows of (question, A, B, C, D, answer letter); 2-3 questions a subject, all four categories.
SAMPLE: dict[str, list[tuple[str, str, str, str, str, str]]] = {
    # STEM
    "elementary_mathematics": [
        ("What is 7 + 5?", "10", "11", "12", "13", "C"),
        ("How many sides does a hexagon have?", "6", "5", "8", "4", "A"),
        ("What is half of 30?", "20", "15", "10", "25", "B"),
    ],
    "astronomy": [
        ("Which planet is closest to the Sun?", "Venus", "Earth", "Mars", "Mercury", "D"),
        ("What is the Moon?", "A star", "A natural satellite of the Earth", "A planet", "A comet", "B"),
    ],
    "high_school_chemistry": [
        ("What is the chemical formula of water?", "H2O", "CO2", "NaCl", "O3", "A"),
        (
            "Which gas do plants take in for photosynthesis?",
            "Oxygen",
            "Helium",
            "Carbon dioxide",
            "Nitrogen",
            "C",
        ),
    ],
    "college_computer_science": [
        ("How many bits are in one byte?", "4", "16", "2", "8", "D"),
        ("Which data structure works last in, first out?", "Queue", "Stack", "Heap", "Tree", "B"),
    ],
    # Social Sciences
    "high_school_geography": [
        ("What is the capital of France?", "Berlin", "Madrid", "Paris", "Rome", "C"),
        ("Which is the largest ocean on Earth?", "Pacific", "Atlantic", "Indian", "Arctic", "A"),
        ("On which continent is Kenya?", "Asia", "Africa", "Europe", "South America", "B"),
    ],
    "high_school_macroeconomics": [
        (
            "What does a central bank usually raise to fight inflation?",
            "Interest rates",
            "Tariffs",
            "Wages",
            "Rents",
            "A",
        ),
        (
            "A general rise in prices over time is called",
            "deflation",
            "recession",
            "inflation",
            "depreciation",
            "C",
        ),
    ],
    "sociology": [
        (
            "The study of human society and social behaviour is called",
            "geology",
            "astronomy",
            "botany",
            "sociology",
            "D",
        ),
        (
            "A family made of parents and their children is a",
            "tribe",
            "nuclear family",
            "clan",
            "committee",
            "B",
        ),
    ],
    # Humanities
    "philosophy": [
        ("Who wrote 'The Republic'?", "Plato", "Newton", "Darwin", "Kafka", "A"),
        (
            "The branch of philosophy about right and wrong is",
            "logic",
            "ethics",
            "aesthetics",
            "geometry",
            "B",
        ),
    ],
    "world_religions": [
        ("In which city is the Kaaba?", "Cairo", "Jerusalem", "Mecca", "Delhi", "C"),
        ("What is the holy book of Islam?", "The Vedas", "The Torah", "The Tripitaka", "The Quran", "D"),
    ],
    "high_school_world_history": [
        ("In which year did the Second World War end?", "1918", "1945", "1939", "1965", "B"),
        ("Who was the first emperor of Rome?", "Augustus", "Nero", "Caesar", "Trajan", "A"),
    ],
    "formal_logic": [
        (
            "If all cats are animals and Tom is a cat, then Tom is",
            "a dog",
            "a plant",
            "an animal",
            "a car",
            "C",
        ),
        (
            "The negation of 'it is raining' is",
            "it is snowing",
            "it is sunny",
            "it rained",
            "it is not raining",
            "D",
        ),
    ],
    # Other
    "nutrition": [
        (
            "Which vitamin does the skin make in sunlight?",
            "Vitamin D",
            "Vitamin C",
            "Vitamin A",
            "Vitamin K",
            "A",
        ),
        ("Which food is the richest in protein?", "Lettuce", "Eggs", "Apples", "Sugar", "B"),
    ],
    "marketing": [
        (
            "A short phrase that a brand repeats in its advertising is a",
            "ledger",
            "slogan",
            "invoice",
            "tariff",
            "B",
        ),
        (
            "The four Ps of marketing are product, price, place and",
            "profit",
            "people",
            "promotion",
            "patent",
            "C",
        ),
    ],
    "global_facts": [
        ("How many continents are there?", "Five", "Six", "Eight", "Seven", "D"),
        ("Which country has the largest population in 2024?", "India", "Brazil", "Germany", "Japan", "A"),
    ],
}


def sample_csv(rows: list[tuple[str, str, str, str, str, str]]) -> str:
    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_sample(root: Path) -> Path:
    """Write the sample in the MMLU tarball layout under `root` (root/data/test/<subject>_test.csv)."""
    folder = Path(root) / "data" / "test"
    folder.mkdir(parents=True, exist_ok=True)
    for subject, rows in SAMPLE.items():
        write_text(folder / f"{subject}_test.csv", sample_csv(rows))
    return Path(root)


def sample_dir() -> Path:
    """The sample under the fedtune cache, (re)written when missing or out of date."""
    root = cache_dir() / "data" / "mmlu-sample"
    folder = root / "data" / "test"
    current = all(
        (folder / f"{s}_test.csv").is_file()
        and (folder / f"{s}_test.csv").read_text(encoding="utf-8") == sample_csv(rows)
        for s, rows in SAMPLE.items()
    )
    return root if current else write_sample(root)


def resolve_mmlu(source: str | None) -> str | None:
    return str(sample_dir()) if source == EMBEDDED_MMLU else source
