"""The recipe pieces several recipes share have one home (issue 23): the
verification metrics, the co-twin lookup, the validation-history picture; and
recipes take the validation history from their context, not from the trainer's
CSV file."""
from __future__ import annotations

import ast
import math

import torch

from recipes.base import DataInfo
from tests.conftest import REPO, artifact_context

HISTORY = [{"step": 1, "epoch": 0, "loss": 2.0, "gender_acc": 0.5, "identity_top1": 0.1, "combined": 0.2},
           {"step": 2, "epoch": 0, "loss": 1.5, "gender_acc": 0.6, "identity_top1": 0.3, "combined": 0.4}]


def _info(**kw) -> DataInfo:
    return DataInfo(identities=tuple(f"id{i}" for i in range(6)), twin_pairs=((0, 1), (3, 5)),
                    label_schemas={"gender": ("female", "male")}, modalities=("jpg", "json"), **kw)


def test_co_twin_comes_from_the_sample_else_from_the_twin_pairs():
    info = _info()
    assert [info.co_twin(i) for i in range(6)] == [1, 0, -1, 5, -1, 3]
    assert info.co_twin(-1) == -1 and info.co_twin(99) == -1
    assert info.co_twin(0, stored=4) == 4 and info.co_twin(2, stored="5") == 5   # the shard's json wins


def test_recipes_share_one_verification_metrics_and_one_co_twin_lookup():
    from recipes import dcal_twins, ear_teacher, photometric, thz, verification

    for module in (dcal_twins, ear_teacher, photometric, thz):
        assert module.VerificationMetrics is verification.VerificationMetrics, module.__name__
    for path in sorted((REPO / "recipes").glob("*.py")):
        text = path.read_text()
        assert "class VerificationMetrics" not in text or path.name == "verification.py", path.name
        assert "for a, b in data_info.twin_pairs" not in text, path.name   # DataInfo.co_twin


def test_recipes_do_not_read_the_trainers_csv_by_path():
    """The validation history comes in the context; the CSV's name belongs to the trainer."""
    for path in sorted((REPO / "recipes").glob("*.py")):
        assert "validation_logs.csv" not in path.read_text(), path.name


def test_facecom_plots_the_history_of_its_context_without_a_csv(tmp_path):
    from recipes.facecom import FaceComParams, FaceComRecipe

    torch.manual_seed(0)
    recipe = FaceComRecipe(FaceComParams(backbone="resnet18", img_size=32, embedding_dim=16, identity_head="linear"),
                           _info())
    model = recipe.build_model()
    assert not (tmp_path / "logs").exists()
    recipe.write_artifacts(model, artifact_context(tmp_path, {}, validation_history=HISTORY))
    assert (tmp_path / "plots" / "training_metrics.png").stat().st_size > 1000
    other = tmp_path / "other"
    recipe.write_artifacts(model, artifact_context(other, {}))   # no history: no picture, no failure
    assert not (other / "plots" / "training_metrics.png").exists()


def test_one_panel_plotter_draws_finite_points_only(tmp_path):
    from dist_train.checkpoint import atomic_write
    from recipes.history_plots import plot_history

    panels = {"loss": ["loss"], "verification": ["eer", "auc"]}
    rows = [{"step": "1", "loss": "2.0", "eer": ""}, {"step": 2, "loss": math.nan, "eer": 0.3, "auc": "x"}]
    assert plot_history(rows, panels, tmp_path / "a.png", atomic_write)
    assert (tmp_path / "a.png").stat().st_size > 1000
    assert not plot_history([{"step": 1, "loss": ""}], panels, tmp_path / "b.png", atomic_write)
    assert not plot_history([], panels, tmp_path / "c.png", atomic_write)
    assert not (tmp_path / "b.png").exists() and not (tmp_path / "c.png").exists()


def test_no_recipe_module_defines_its_own_history_plot():
    """One panel plotter: no recipe module but ``history_plots`` builds a figure of
    panels from rows of validation metrics (``plt.subplots`` over a row series)."""
    for path in sorted((REPO / "recipes").glob("*.py")):
        if path.name == "history_plots.py":
            continue
        tree = ast.parse(path.read_text())
        names = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
        assert not names & {"plot_validation", "plot_validation_metrics"}, path.name


def test_psnr_and_0_1_metrics_get_separate_y_axes():
    """PSNR (dB) beside SSIM/EER on one axis flattens the 0-1 curves: the others go on a right axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from recipes.history_plots import plot_metrics

    rows = [{"step": 1, "ssim": 0.4, "psnr": 18.0, "eer": 0.3}, {"step": 2, "ssim": 0.6, "psnr": 22.5, "eer": ""}]
    fig, ax = plt.subplots()
    twin = plot_metrics(ax, rows, ["ssim", "psnr", "eer"])
    assert twin is not None and len(fig.axes) == 2
    assert sorted(line.get_label() for line in ax.get_lines()) == ["eer", "ssim"]
    assert [line.get_label() for line in twin.get_lines()] == ["psnr"]
    assert ax.get_ylim()[1] <= 1.1 and twin.get_ylim()[1] >= 22.5
    plt.close(fig)
    fig, ax = plt.subplots()
    assert plot_metrics(ax, rows, ["ssim", "eer"]) is None and len(fig.axes) == 1   # one scale: one axis
    plt.close(fig)


def test_the_run_plot_puts_psnr_on_its_own_axis(tmp_path):
    """plots/latest.png of a THz run: the validation panel has a second y axis for PSNR."""
    from unittest import mock

    import matplotlib.figure

    from dist_train.run_logging import plot_curves

    saved = []
    real = matplotlib.figure.Figure.savefig
    with mock.patch.object(matplotlib.figure.Figure, "savefig", lambda self, *a, **k: (saved.append(self),
                                                                                        real(self, *a, **k))):
        plot_curves([{"step": 1, "loss": 1.0, "lr": 0.1}, {"step": 2, "loss": 0.5, "lr": 0.1}],
                    [{"step": 2, "loss": 0.7, "ssim": 0.5, "psnr": 21.0}], tmp_path / "latest.png")
    (fig,) = saved
    assert len(fig.axes) == 4                         # losses, lr, 0-1 metrics, and PSNR's right axis
    assert (tmp_path / "latest.png").stat().st_size > 1000
