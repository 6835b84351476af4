"""The subject → category mapping covers the 57 MMLU subjects exactly, as lm-eval's mmlu groups do."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

from fedtune.eval.categories import (
    CATEGORIES,
    LEADERBOARD_CATEGORIES,
    SUBJECT_CATEGORY,
    SUBJECTS_BY_CATEGORY,
    category_of,
)

# The 57 subject names of the MMLU test set (the files of the original tarball), written out.
MMLU_57 = [
    "abstract_algebra",
    "anatomy",
    "astronomy",
    "business_ethics",
    "clinical_knowledge",
    "college_biology",
    "college_chemistry",
    "college_computer_science",
    "college_mathematics",
    "college_medicine",
    "college_physics",
    "computer_security",
    "conceptual_physics",
    "econometrics",
    "electrical_engineering",
    "elementary_mathematics",
    "formal_logic",
    "global_facts",
    "high_school_biology",
    "high_school_chemistry",
    "high_school_computer_science",
    "high_school_european_history",
    "high_school_geography",
    "high_school_government_and_politics",
    "high_school_macroeconomics",
    "high_school_mathematics",
    "high_school_microeconomics",
    "high_school_physics",
    "high_school_psychology",
    "high_school_statistics",
    "high_school_us_history",
    "high_school_world_history",
    "human_aging",
    "human_sexuality",
    "international_law",
    "jurisprudence",
    "logical_fallacies",
    "machine_learning",
    "management",
    "marketing",
    "medical_genetics",
    "miscellaneous",
    "moral_disputes",
    "moral_scenarios",
    "nutrition",
    "philosophy",
    "prehistory",
    "professional_accounting",
    "professional_law",
    "professional_medicine",
    "professional_psychology",
    "public_relations",
    "security_studies",
    "sociology",
    "us_foreign_policy",
    "virology",
    "world_religions",
]


def test_57_subjects_each_in_exactly_one_category():
    assert len(MMLU_57) == 57 == len(set(MMLU_57))
    listed = [s for subjects in SUBJECTS_BY_CATEGORY.values() for s in subjects]
    assert len(listed) == 57 == len(set(listed))  # no subject twice
    assert set(SUBJECT_CATEGORY) == set(MMLU_57)
    assert {k: len(v) for k, v in SUBJECTS_BY_CATEGORY.items()} == {
        "STEM": 19,
        "Social Sciences": 12,
        "Humanities": 13,
        "Other": 13,
    }
    assert (*LEADERBOARD_CATEGORIES, "Other") == CATEGORIES
    assert LEADERBOARD_CATEGORIES == ("STEM", "Social Sciences", "Humanities")


@pytest.mark.parametrize(
    ("subject", "category"),
    [
        ("anatomy", "STEM"),
        ("formal_logic", "Humanities"),
        ("econometrics", "Social Sciences"),
        ("global_facts", "Other"),
        ("machine_learning", "STEM"),
        ("professional_law", "Humanities"),
    ],
)
def test_known_placements(subject, category):
    assert category_of(subject) == category
    assert category_of("not_a_subject") is None


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None, reason="lm-eval not installed")
def test_same_mapping_as_lm_eval_mmlu_groups():
    """lm-eval tags each mmlu_<subject> task with its group: our mapping must be the same."""
    folder = Path(importlib.util.find_spec("lm_eval").submodule_search_locations[0]) / "tasks/mmlu/default"
    tags = {
        "mmlu_stem_tasks": "STEM",
        "mmlu_social_sciences_tasks": "Social Sciences",
        "mmlu_humanities_tasks": "Humanities",
        "mmlu_other_tasks": "Other",
    }
    theirs = {}
    for path in folder.glob("mmlu_*.yaml"):
        text = path.read_text()
        subject = re.search(r'"dataset_name":\s*"([^"]+)"', text).group(1)
        tag = re.search(r'"tag":\s*"([^"]+)"', text).group(1)
        theirs[subject] = tags[tag]
    assert theirs == SUBJECT_CATEGORY
