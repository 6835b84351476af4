"""The 57 MMLU subjects and their categories: the grouping of the MMLU paper as tagged by lm-eval's
`mmlu` groups (`mmlu_stem`, `mmlu_social_sciences`, `mmlu_humanities`, `mmlu_other`) and used by the
FlowerTune General-NLP evaluation. The leaderboard averages the first three; Other is reported apart."""

from __future__ import annotations

STEM = "STEM"
SOCIAL_SCIENCES = "Social Sciences"
HUMANITIES = "Humanities"
OTHER = "Other"

# Leaderboard order; the average is the plain mean of these three category accuracies.
LEADERBOARD_CATEGORIES = (STEM, SOCIAL_SCIENCES, HUMANITIES)
CATEGORIES = (*LEADERBOARD_CATEGORIES, OTHER)

SUBJECTS_BY_CATEGORY: dict[str, tuple[str, ...]] = {
    STEM: (
        "abstract_algebra",
        "anatomy",
        "astronomy",
        "college_biology",
        "college_chemistry",
        "college_computer_science",
        "college_mathematics",
        "college_physics",
        "computer_security",
        "conceptual_physics",
        "electrical_engineering",
        "elementary_mathematics",
        "high_school_biology",
        "high_school_chemistry",
        "high_school_computer_science",
        "high_school_mathematics",
        "high_school_physics",
        "high_school_statistics",
        "machine_learning",
    ),
    SOCIAL_SCIENCES: (
        "econometrics",
        "high_school_geography",
        "high_school_government_and_politics",
        "high_school_macroeconomics",
        "high_school_microeconomics",
        "high_school_psychology",
        "human_sexuality",
        "professional_psychology",
        "public_relations",
        "security_studies",
        "sociology",
        "us_foreign_policy",
    ),
    HUMANITIES: (
        "formal_logic",
        "high_school_european_history",
        "high_school_us_history",
        "high_school_world_history",
        "international_law",
        "jurisprudence",
        "logical_fallacies",
        "moral_disputes",
        "moral_scenarios",
        "philosophy",
        "prehistory",
        "professional_law",
        "world_religions",
    ),
    OTHER: (
        "business_ethics",
        "clinical_knowledge",
        "college_medicine",
        "global_facts",
        "human_aging",
        "management",
        "marketing",
        "medical_genetics",
        "miscellaneous",
        "nutrition",
        "professional_accounting",
        "professional_medicine",
        "virology",
    ),
}

SUBJECT_CATEGORY: dict[str, str] = {
    subject: category for category, subjects in SUBJECTS_BY_CATEGORY.items() for subject in subjects
}


def category_of(subject: str) -> str | None:
    return SUBJECT_CATEGORY.get(subject)
