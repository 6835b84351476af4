"""bench/pyspy_top.py reads py-spy's raw output as py-spy writes it with --subprocesses: a child's stack under
its parent's, a command line that holds a newline; each sample counts for the innermost process."""

from __future__ import annotations

from bench.pyspy_top import read, summary

RAW = (
    'process 10:"python -m parent";main (bench/parent.py:3);wait (subprocess.py:9) 4\n'
    'process 10:"python -m parent";main (bench/parent.py:3);run (subprocess.py:5);'
    'process 11:"python -c import json\nwork()";<module> (<string>:1);dumps (json/__init__.py:231) 6\n'
    'process 10:"python -m parent";main (bench/parent.py:4);compute (bench/parent.py:20) 10\n'
)


def test_samples_go_to_the_innermost_process(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text(RAW)
    stacks = read(path)
    assert {process: sum(n for _, n in s) for process, s in stacks.items()} == {
        'process 10:"python -m parent"': 14, 'process 11:"python -c import json work()"': 6,
    }
    text = summary(path, top=5, min_share=0.0)
    parent = text.split("== process 11")[0]
    assert "100.0%  main (bench/parent.py)" in parent and "71.4%  compute (bench/parent.py)" in parent
    assert "dumps" not in parent  # the child's frames are not the parent's


def test_focus_keeps_only_what_runs_under_the_frame(tmp_path):
    path = tmp_path / "raw.txt"
    path.write_text(RAW)
    text = summary(path, top=5, min_share=0.0, focus="wait")
    assert "4 samples under 'wait'" in text and "100.0%  wait (subprocess.py)" in text
    assert "compute" not in text and "process 11" not in text
