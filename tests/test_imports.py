"""The project's structure, drawn from its imports, stays one-way: ops <- model <- weights, ops <- model <- losses
<- training <- train_gan, train_encoder, with data.py underneath (it imports cli.py alone) and
prepare.py on data.py alone. The inference scripts, invert.py and generate.py, need model.py, losses.py,
data.py, ops/ and (generate.py, for official checkpoints) weights.py only, so
that they can be copied into another project without the training loops: checked by reading every file's
imports, and by segmenting images and drawing pairs in a process where the training scripts cannot be
imported."""
import ast
import os
import subprocess
import sys
import textwrap

import numpy as np
from PIL import Image

from test_invert import tiny_bundle, write_images

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROJECT = ("cli", "datasets", "ops", "model", "weights", "losses", "report", "training", "benchmark", "data",
           "prepare", "train_gan", "train_encoder", "invert",
           "generate")

# What each file may import from the project at module level (model.py's command line reads data.py's option
# types inside build_parser; data.py's `prepare` alias imports prepare.py inside main: neither at import).
MAY_IMPORT = {
    "cli.py": set(),
    "data.py": {"cli"},
    "datasets.py": {"data"},
    "prepare.py": {"cli", "data", "datasets"},
    "model.py": {"ops"},
    "weights.py": {"cli", "data", "model"},
    "losses.py": {"data", "ops", "model"},
    "report.py": {"data", "losses"},
    "training.py": {"cli", "data", "losses", "model"},
    "train_gan.py": {"cli", "data", "losses", "model", "training", "weights"},
    "train_encoder.py": {"cli", "data", "losses", "model", "report", "training", "weights"},
    "invert.py": {"cli", "data", "losses", "model", "report"},
    "generate.py": {"cli", "data", "model", "weights"},
    "benchmark.py": {"cli", "data", "invert", "losses", "model", "ops", "train_encoder", "train_gan"},
}


def project_imports(file):
    """The project modules `file` imports at module level (its top-level import statements)."""
    with open(os.path.join(ROOT, file)) as f:
        tree = ast.parse(f.read())
    found = set()
    for node in tree.body:
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            found.add(node.module.split(".")[0])
    return found & set(PROJECT)


def test_every_file_imports_only_what_lies_below_it():
    for file, allowed in MAY_IMPORT.items():
        assert project_imports(file) <= allowed, (file, project_imports(file) - allowed)


# Run in a fresh interpreter: an import finder that refuses the training scripts (and prepare.py), then the
# inference scripts imported and run end to end.
WITHOUT_TRAINING = textwrap.dedent("""
    import sys

    class Refuse:
        def find_spec(self, name, path=None, target=None):
            if name in ("train_gan", "train_encoder", "training", "prepare"):
                raise ImportError(f"{name} may not be imported here")

    sys.meta_path.insert(0, Refuse())
    import data, generate, invert
    assert not {"train_gan", "train_encoder", "training", "prepare"} & set(sys.modules), sorted(sys.modules)
    model_pt, images, masks, out = sys.argv[1:]
    invert.main([images, "--model", model_pt, "--eval", masks, "--out", out + "/seg", "--steps", "2",
                 "--save-reconstruction"])
    generate.main(["--ckpt", model_pt, "--n", "2", "--out", out + "/synth", "--mean-samples", "16"])
    print("ok")
""")


def test_inference_runs_without_the_training_scripts(tmp_path):
    model_pt = tiny_bundle(tmp_path / "model.pt")
    write_images(tmp_path / "images", count=2, masks=tmp_path / "masks")
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    done = subprocess.run([sys.executable, "-c", WITHOUT_TRAINING, model_pt, str(tmp_path / "images"),
                           str(tmp_path / "masks"), str(tmp_path)], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stderr[-3000:]
    for i in range(2):
        mask = np.asarray(Image.open(tmp_path / f"seg/scene{i}.png"))
        assert mask.shape == (32, 32) and mask.max() < 3
        assert (tmp_path / f"seg/scene{i}_recon.png").exists()
    assert (tmp_path / "seg/metrics.json").exists()
    assert sorted(p.name for p in (tmp_path / "synth/masks").iterdir()) == ["000000.png", "000001.png"]


def test_the_converter_command_lists_the_releases_and_the_data_commands():
    """`python prepare.py --help` lists every release, the layout each expects, and the data commands."""
    import prepare

    done = subprocess.run([sys.executable, "prepare.py", "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    for name in list(prepare.CONVERTERS) + ["split", "check", "show", "demo"]:
        assert name in done.stdout, name
    assert "**/CXR_png/NAME.png" in done.stdout  # and the layouts they expect
