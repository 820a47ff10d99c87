"""The top-level Python reads side by side on a laptop: no line passes 100 characters (URLs aside)."""
import glob
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_no_line_passes_100_characters():
    wide = [f"{os.path.basename(path)}:{n}: {len(line)} characters"
            for path in sorted(glob.glob(os.path.join(ROOT, "*.py")))
            for n, line in enumerate(open(path, encoding="utf-8").read().splitlines(), 1)
            if len(line) > 100 and "://" not in line]
    assert not wide, "\n".join(wide)


def test_no_script_imports_another_and_data_imports_no_model():
    scripts = ("train_ae", "train_dit", "evaluate")
    for path in glob.glob(os.path.join(ROOT, "*.py")):
        text = open(path, encoding="utf-8").read()
        for script in scripts:
            assert f"import {script}" not in text and f"from {script} " not in text, (path, script)
    data = open(os.path.join(ROOT, "data.py"), encoding="utf-8").read()
    for word in ("import vitok", "import dit", "from vitok", "init_process_group"):
        assert word not in data, word
