import shutil

from lorafuse.methods.run import evaluate_method, fit_method
from lorafuse.spec import load_spec
from lorafuse.workspace import Workspace


def test_dbg(mini_bench, tmp_path):
    bench = tmp_path / "bench"
    shutil.copytree(mini_bench, bench)
    ws = Workspace(load_spec(bench))
    fit = fit_method(ws, "route-sgd", "private", {"epochs": 3, "lr": 0.1, "batch_size": 5}).payload
    print(
        "fit",
        fit["validation_loss"],
        fit["best_step"],
        fit["steps"],
        [h["validation"] for h in fit["runs"][0]["history"]],
    )
    print("eval", evaluate_method(ws, "route-sgd", "validation").mean)
    from lorafuse.formats.routed import load_routed
    from lorafuse.methods.fused_sgd import validation_loss

    f = load_routed(ws.model, fit["routed"], library=ws.library("private"))
    print("reval", validation_loss(ws, 32)())
    f.detach()
    from lorafuse.fast import layer as _l  # noqa
