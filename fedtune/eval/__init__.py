"""MMLU evaluation by FlowerTune categories (`fedtune eval`)."""
