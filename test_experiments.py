"""experiments.py: the commands and paths the README shows are the ones a user types."""
from __future__ import annotations

import os

import experiments


def test_the_readme_command_is_the_recipe_not_the_restart():
    root = experiments.ROOT
    run = f"python train.py --dataset camvid --data-root data/CamVid --loss aaf --seed 2 --out {root}/runs/evidence/camvid/aaf_seed2"
    assert experiments.recipe(run + " --no-eval --overwrite", 2) == (
        "python train.py --dataset camvid --data-root data/CamVid --loss aaf --seed S "
        "--out runs/evidence/camvid/aaf_seedS --no-eval")
    resumed = run + f" --no-eval --resume {root}/runs/evidence/camvid/aaf_seed2/last.pt"
    assert experiments.recipe(resumed, 2) == experiments.recipe(run + " --no-eval", 2)


def test_a_linked_data_folder_is_shown_as_typed(tmp_path):
    """data/CamVid is often a link to the real folder: the README shows data/CamVid, not its target."""
    link = experiments.ROOT / "data" / "test_experiments_link"
    made = not link.parent.exists()
    link.parent.mkdir(exist_ok=True)
    link.symlink_to(tmp_path, target_is_directory=True)
    try:
        assert experiments.shown(link) == os.path.join("data", "test_experiments_link")
        assert experiments.shown(tmp_path) == str(tmp_path)          # outside the repository: as given
        assert experiments.shown(experiments.ROOT / "results" / "x.json") == os.path.join("results", "x.json")
    finally:
        link.unlink()
        if made:
            link.parent.rmdir()
